"""Stopping ranks: SIGINT, then SIGTERM, then SIGKILL, each bounded, to each rank's whole group.

Every child rank leads its own process group (see child.py), so signalling the group reaches its
DataLoader workers and other grandchildren, even those whose parent already died. A group
outlives its leader while any member lives, so the last sweep goes to the group, not the pid.
"""
from __future__ import annotations

import os
import signal
import time
from typing import Iterable

GRACE_SIGINT = 1.0  # seconds for KeyboardInterrupt handlers and DataLoader shutdown
GRACE_SIGTERM = 1.0


def _signal_rank(pid: int, sig: int) -> None:
    for send in (os.killpg, os.kill):  # before setpgid ran, the group does not exist yet
        try:
            send(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def group_alive(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_ranks(procs: Iterable, first: int = signal.SIGINT) -> None:
    """Bring every rank process and its group down, escalating from `first` to SIGKILL."""
    procs = [p for p in procs if p.pid is not None]
    ladder = [(signal.SIGINT, GRACE_SIGINT), (signal.SIGTERM, GRACE_SIGTERM), (signal.SIGKILL, 5.0)]
    start = [sig for sig, _ in ladder].index(first)
    for sig, grace in ladder[start:]:
        live = [p for p in procs if p.exitcode is None or group_alive(p.pid)]
        if not live:
            break
        for p in live:
            _signal_rank(p.pid, sig)
        deadline = time.monotonic() + grace
        for p in live:
            p.join(max(0.0, deadline - time.monotonic()))
        while time.monotonic() < deadline and any(group_alive(p.pid) for p in live):
            time.sleep(0.02)


def sweep_groups(procs: Iterable) -> None:
    """After ranks have exited by themselves, kill whatever their groups still hold."""
    for p in procs:
        if p.pid is not None and group_alive(p.pid):
            _signal_rank(p.pid, signal.SIGKILL)
