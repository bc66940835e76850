"""Shared test helpers: looking at the process table the way a user would (`ps`)."""
from __future__ import annotations

import os
import sys
import time

import psutil


# Jupyter kernels the test session keeps running on purpose (conftest's `shared_kernel`): each
# one is kept, with its own warm forkserver and resource tracker, but never what they started.
SHARED_KERNELS: set[int] = set()
_KEEPER_MAINS = ("multiprocess.forkserver import main", "multiprocess.resource_tracker import main")


def keepers() -> set[int]:
    """Processes mpify keeps on purpose between launches: the warm forkservers and the resource
    tracker of multiprocess; and the session's shared kernel with its own of them."""
    pids = set()
    try:
        from multiprocess import resource_tracker

        from mpify.engine import starter
        pids |= starter.server_pids()
        if resource_tracker._resource_tracker._pid:
            pids.add(resource_tracker._resource_tracker._pid)
    except Exception:
        pass
    for kernel in SHARED_KERNELS:
        try:
            children = psutil.Process(kernel).children()
        except psutil.NoSuchProcess:
            continue
        pids.add(kernel)
        for child in children:  # its ranks are the forkserver's children, never kept
            try:
                if any(m in " ".join(child.cmdline()) for m in _KEEPER_MAINS):
                    pids.add(child.pid)
            except psutil.NoSuchProcess:
                pass
    return pids


def strays(root: int | None = None) -> list[psutil.Process]:
    """Descendants of `root` (default: this process) other than the keepers, still running."""
    root_proc = psutil.Process(root or os.getpid())
    keep = keepers()
    out = []
    for p in root_proc.children(recursive=True):
        try:
            if p.pid not in keep and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def alive(pids) -> list[int]:
    """Which of `pids` (or members of their process groups) are still running."""
    found = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            if p.pid in pids or os.getpgid(p.pid) in pids:
                found.append(p.pid)
        except (psutil.NoSuchProcess, ProcessLookupError):
            pass
    return found


def wait_gone(pids, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = alive(pids)
        if not left:
            return []
        time.sleep(0.05)
    return alive(pids)


def python_script(tmp_path, text: str, name: str = "launcher.py"):
    path = tmp_path / name
    path.write_text(text)
    return [sys.executable, "-u", str(path)]


def die_with_parent() -> None:
    """preexec_fn for launcher subprocesses: if the test process is killed (a timeout), the
    launcher gets SIGKILL too, and its ranks follow it (their watchdogs), so nothing is orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal
        ctypes.CDLL(None).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG


def parallel(*calls):
    """Call each of `calls` (no arguments) in a thread of its own and return their results in
    order: for independent fresh interpreters (a slice and the whole notebook, say), which then
    start side by side instead of one after the other."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = [pool.submit(call) for call in calls]
        return [f.result() for f in futures]
