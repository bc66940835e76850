"""Helpers for the `mpify run` / `mpify export` tests: the installed console script as a user runs
it, in its own session and with a TMPDIR of the test's own, so that what it leaves behind (files,
processes) can be seen."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "sample_notebooks"
MPIFY = os.path.join(os.path.dirname(sys.executable), "mpify")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")


def session_procs(sid: int) -> list[int]:
    """Live (non-zombie) processes of session `sid`: the command and everything it started."""
    out = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == sid:
                out.append(p.pid)
        except (psutil.NoSuchProcess, ProcessLookupError, PermissionError):
            pass
    return out


def wait_session_gone(sid: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        left = session_procs(sid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def short_tmp(tmpdir: Path) -> str:
    """`tmpdir` by a short name (a symlink beside the session's others), to use as TMPDIR.

    A socket's path has at most 107 bytes on Linux, and multiprocessing puts its own under
    TMPDIR (`pymp-XXXXXXXX/listener-XXXXXXXX`: a DataLoader worker's resource sharer binds one
    to pass a batch's tensors). Under a test's own tmp_path, nested one level deeper by
    pytest-xdist, that path ran past 107 bytes: the worker's queue feeder dropped the batch
    ("AF_UNIX path too long", printed only to the captured stderr) and the loop waited for it
    for good. A user with a long TMPDIR meets the same in torch without mpify."""
    global _LINKS
    with _LINKS_LOCK:
        if _LINKS is None:
            import atexit
            import shutil
            import tempfile

            _LINKS = tempfile.mkdtemp(prefix="mpt-", dir="/tmp")
            atexit.register(shutil.rmtree, _LINKS, True)
    link = os.path.join(_LINKS, str(next(_NUMBERS)))  # count's next() is atomic: tests call this from threads
    os.symlink(tmpdir, link)
    return link


_LINKS: str | None = None
_LINKS_LOCK = threading.Lock()
_NUMBERS = itertools.count()


def env_with_tmp(tmpdir: Path) -> dict:
    env = dict(os.environ)
    env["TMPDIR"] = short_tmp(tmpdir)
    env["PYTHONUNBUFFERED"] = "1"
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(k, None)
    return env


def run_cmd(cmd: list, tmpdir: Path, cwd=None, timeout: float = 240, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    """Run `cmd` in a new session with TMPDIR=tmpdir (and `env` added); assert it left no process behind."""
    tmpdir.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, env={**env_with_tmp(tmpdir), **(env or {})}, cwd=cwd, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        raise AssertionError(f"{cmd} ran past {timeout} s\nstdout: {out[-2000:]}\nstderr: {err[-4000:]}")
    left = wait_session_gone(p.pid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"{cmd[:3]} left processes behind: {left}"
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def mpify(*args, tmpdir: Path, cwd=None, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cmd([MPIFY, *args], tmpdir, cwd=cwd, timeout=timeout, env=env)


def leftovers(tmpdir: Path) -> list[str]:
    """What mpify left in the temp root (torch's own caches, which torch keeps on purpose, aside)."""
    return sorted(n for n in os.listdir(tmpdir) if not n.startswith(("torchinductor_", "torchelastic_")))
