import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from helpers import strays  # noqa: E402


@pytest.fixture
def no_strays():
    """Fails the test if it leaves any process of its own behind (keepers aside)."""
    yield
    left = strays()
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()[:3]) for p in left]}"
