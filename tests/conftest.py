import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# mpify's disk caches (star imports, notebooks read before) go to a directory of the test run's
# own, never the user's ~/.cache/mpify; subprocesses (`mpify export`, kernels) inherit it.
_CACHE = os.environ["MPIFY_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpify-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(_CACHE, ignore_errors=True)

from helpers import strays  # noqa: E402


@pytest.fixture
def no_strays():
    """Fails the test if it leaves any process of its own behind (keepers aside)."""
    yield
    left = strays()
    for p in left:
        p.kill()
    assert not left, f"processes left behind: {[(p.pid, p.cmdline()[:3]) for p in left]}"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory):
    """A Jupyter kernelspec that runs this very interpreter (the venv with mpify installed), so
    nbclient starts a real ipykernel that can import mpify."""
    import json

    root = tmp_path_factory.mktemp("jupyter")
    name = "mpify-test"
    spec_dir = root / "kernels" / name
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mpify test", "language": "python"}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield name
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def run_notebook(nb, kernel_name, cwd=None, timeout=300):
    """Execute a notebook in a real kernel (nbclient), errors kept in the outputs."""
    from nbclient import NotebookClient

    client = NotebookClient(nb, kernel_name=kernel_name, timeout=timeout, allow_errors=True,
                            resources={"metadata": {"path": str(cwd or os.getcwd())}})
    client.execute()
    return nb


@pytest.fixture
def tmpdir_(tmp_path):
    """A TMPDIR of the test's own for `mpify run`/`export`: nothing may be left in it."""
    from export_helpers import leftovers

    d = tmp_path / "tmproot"
    d.mkdir()
    yield d
    assert leftovers(d) == [], "mpify run left files in the temp root"


@contextmanager
def jupyter_kernel(kernel_name):
    """A real kernel (jupyter_client) and its client, ready; shut down afterwards."""
    from jupyter_client.manager import KernelManager

    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=60)
        yield km, kc
    finally:
        kc.stop_channels()
        if km.is_alive():
            km.shutdown_kernel(now=True)
