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
        sys.__stderr__.write(f"[mpify {time.monotonic():.3f}] " + " ".join(map(str, parts)) + "\n")
        sys.__stderr__.flush()
