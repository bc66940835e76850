"""MPIFY_DEBUG=1: the engine's events on the caller's real stderr, for bug reports.

Written to sys.__stderr__ (the kernel's terminal, not the cell), so that the debug lines never
mix with the ranks' output that the cell shows.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Any

DEBUG = os.environ.get("MPIFY_DEBUG", "") not in ("", "0")


def debug(*parts: Any) -> None:
    if DEBUG:
        try:
            sys.__stderr__.write(f"[mpify {time.monotonic():.3f}] " + " ".join(map(str, parts)) + "\n")
            sys.__stderr__.flush()
        except (OSError, ValueError, AttributeError):
            # stderr closed or gone (`mpify run ... 2>&1 | head`): a debug line is never worth an
            # exception, least of all in the supervisor thread, whose death would hang the launch.
            pass
