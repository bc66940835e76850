"""Stopping ranks: SIGINT, then SIGTERM, then SIGKILL, each bounded, to each rank's whole group.

Every child rank leads its own process group (see rank/child.py), so signalling the group reaches its
DataLoader workers and other grandchildren, even those whose parent already died. A group
outlives its leader while any member lives, so the last sweep goes to the group, not the pid.

A rank alone (before it has made its group, or when asking whether it still runs) is reached
through a pidfd opened when it started (`track`, Linux), never by its pid: by the time a launch
tears down, a rank that exited was reaped long ago, and its pid may belong to another process or
to a thread of one (kill() of a thread's id signals its whole process). On a machine whose pids
wrap quickly (a test run, pid_max 32768) a kill by a stale pid is a kill of a stranger.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from typing import Iterable

GRACE_SIGINT = 1.0  # seconds for KeyboardInterrupt handlers and DataLoader shutdown
GRACE_SIGTERM = 1.0


_pidfds_lock = threading.Lock()
# Whether this kernel has pidfds: Python has os.pidfd_open on Linux, which kernels before 5.3 (some
# clusters' still) answer with ENOSYS; there ranks are signalled by pid, as before.
_pidfds_work = hasattr(os, "pidfd_open")


def track(handles: dict, pid: int | None) -> None:
    """Open the pidfd of a rank just started into `handles` (pid -> pidfd, -1: gone already),
    the launch's or the world's own: a pid reused while an older launch or world still holds its
    dead rank's entry is another entry there. Where pidfds do not exist, nothing is kept and
    ranks are signalled by pid, as before."""
    global _pidfds_work
    if pid is None or not _pidfds_work:
        return
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        fd = -1  # it exited and was reaped (by the forkserver that started it) already
    except OSError:
        _pidfds_work = False  # ENOSYS: no pidfds in this kernel
        return
    with _pidfds_lock:
        old = handles.get(pid, -1)
        if old >= 0:
            os.close(old)
        handles[pid] = fd


def release(handles: dict) -> None:
    """Close the pidfds of a launch or world that is done with its ranks."""
    with _pidfds_lock:
        for fd in handles.values():
            if fd >= 0:
                os.close(fd)
        handles.clear()


def signal_alone(pid: int, sig: int, handles: dict | None) -> bool:
    """Send `sig` (0: only ask) to the rank process alone; False when it is gone. Where pidfds
    exist, a rank without one in `handles` (released by a teardown that ran meanwhile) is taken
    as gone: never signalled by its number. `handles` None: by pid (a process not started as a
    rank, or no pidfds here)."""
    if _pidfds_work and handles is not None:
        with _pidfds_lock:
            fd = handles.get(pid, -1)
            if fd < 0:
                return False
            try:
                signal.pidfd_send_signal(fd, sig)
                return True
            except OSError:  # ProcessLookupError: exited and reaped
                return False
    try:
        os.kill(pid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _signal_rank(pid: int, sig: int, handles: dict | None = None) -> None:
    """Send `sig` once to the rank's group, or to the rank alone before setpgid made its group.
    Never both: the rank is in its group, and a second SIGINT lands in whatever the first one's
    KeyboardInterrupt is doing (once, its report to the caller, whose message was lost)."""
    try:
        os.killpg(pid, sig)
        return
    except (ProcessLookupError, PermissionError):
        pass
    signal_alone(pid, sig, handles)


def group_alive(pid: int) -> bool:
    """Some process of the group `pid` still runs. A group of zombies alone is not alive: an
    orphan's zombie waits for init to reap it, which some inits do only every second or so (srun's
    helper child, orphaned at srun's exit, kept a Slurm node's group "alive" for a second per
    launch, and the stop waited for it)."""
    try:
        os.killpg(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return _runs_in_group(pid)


def _runs_in_group(pgid: int) -> bool:
    """Whether a process of group `pgid` is not a zombie, read from /proc (Linux); elsewhere, or
    if /proc cannot be read, True (the group counts as alive while kill() reaches it)."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return True
    for entry in entries:
        fields = _stat(entry) if entry.isdigit() else None
        # after the command: state, ppid, pgrp (proc(5))
        if fields is not None and len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in _GONE:
            return True
    return False


_GONE = (b"Z", b"X")  # /proc/PID/stat states of a process that has exited: zombie, dead


def _stat(pid: int | str) -> list[bytes] | None:
    """The fields of /proc/PID/stat after the command's name, or None (gone, or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def rank_alive(pid: int, handles: dict | None = None) -> bool:
    """The rank, unreaped, or anything else in its group still runs. Checked by signal 0 only: the supervisor
    thread alone reads the processes' exit codes (two readers of one multiprocess sentinel race,
    and the loser sees exit code 255)."""
    if group_alive(pid):
        return True
    # A rank that has not yet made its own group; or one that died and is not yet reaped: its
    # parent's report of the death is still to come, and the stop waits for it.
    return signal_alone(pid, 0, handles)


def _dead(pid: int) -> bool:
    """The process has exited and waits to be reaped (a zombie). A signal sent to it now is not
    what it died of. Linux only; elsewhere a rank counts as alive until it is reaped."""
    fields = _stat(pid)
    return bool(fields) and fields[0] in _GONE


def stop_ranks(pids: Iterable[int], first: int = signal.SIGINT, sent: dict | None = None,
               handles: dict | None = None) -> None:
    """Bring every rank process and its group down, escalating from `first` to SIGKILL.
    `sent` (pid -> set of signals) records what was sent, so a death can be told apart from
    one this teardown caused; `handles`: the ranks' pidfds (`track`)."""
    pids = [pid for pid in pids if pid is not None]
    ladder = [(signal.SIGINT, GRACE_SIGINT), (signal.SIGTERM, GRACE_SIGTERM), (signal.SIGKILL, 5.0)]
    start = [sig for sig, _ in ladder].index(first)
    for sig, grace in ladder[start:]:
        live = [pid for pid in pids if rank_alive(pid, handles)]
        if not live:
            break
        for pid in live:
            if sent is not None and not _dead(pid):
                sent.setdefault(pid, set()).add(sig)
            _signal_rank(pid, sig, handles)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(rank_alive(pid, handles) for pid in live):
            time.sleep(0.01)


# How long sweep_groups waits for what it killed to be gone: a SIGKILLed process exits within
# milliseconds, but its exit is not done when kill() returns.
SWEEP_WAIT = 2.0


def sweep_groups(pids: Iterable[int], handles: dict | None = None) -> None:
    """After ranks have exited by themselves, kill whatever their groups still hold (a
    DataLoader's workers, a rank's own subprocesses), and wait until it is gone: a launch
    returned while a killed worker was still exiting, seen in the process table as a stray."""
    swept = [pid for pid in pids if pid is not None and group_alive(pid)]
    for pid in swept:
        _signal_rank(pid, signal.SIGKILL, handles)
    deadline = time.monotonic() + SWEEP_WAIT
    while swept and time.monotonic() < deadline:
        swept = [pid for pid in swept if group_alive(pid)]
        if swept:
            time.sleep(0.005)
