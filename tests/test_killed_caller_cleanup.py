"""A caller SIGKILLed mid-work leaves nothing in the temp folder: whoever outlives it (its
forkservers and its zygote, which exit once its ranks have ended themselves) removes what it can
no longer remove itself.

A killed caller's atexit handlers and finalizers never run, so before this the failure suites
left `pymp-*` folders (multiprocess's, holding the forkservers' listener sockets) and
`mpify-preload-*.json` verdicts behind in the temp folder. Here a real Jupyter kernel with a live
world and a plain script in the middle of a launch are SIGKILLed, each with a TMPDIR of the test's
own: the kernel as Jupyter kills one (its whole process group), the script alone. Once every
process they started has exited, that TMPDIR must hold nothing of theirs."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid

import psutil
import pytest

from helpers import alive, die_with_parent, python_script, wait_gone

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="forkservers: Linux")

LAUNCHER = """
import os, time
from mpify import ranch

def f():
    print("RANK PID", os.getpid(), flush=True)
    time.sleep(120)

ranch(3, f)
"""

MARK = "MPIFY_TEST_KILLED_CALLER"


def marked(mark: str) -> set[int]:
    """Every live process started with MARK=mark in its environment (the caller's descendants
    inherit it, wherever they were reparented to once the caller died)."""
    found = set()
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.info["status"] != psutil.STATUS_ZOMBIE and p.environ().get(MARK) == mark:
                found.add(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError):
            pass
    return found


def theirs(tmp) -> list[str]:
    """What multiprocess and mpify made in the temp folder (the kernel may make folders of its own)."""
    return sorted(name for name in os.listdir(tmp) if name.startswith(("pymp-", "mpify-")))


def wait_until(done, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_killed_kernel_and_launcher_leave_no_temp_files(kernel_name, tmp_path):
    from jupyter_client.manager import KernelManager

    tmp = tmp_path / "tmproot"
    tmp.mkdir()
    mark = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
    env.update(TMPDIR=str(tmp), **{MARK: mark})

    # (b) a script in the middle of ranch(3, f): its ranks sleep
    launcher = subprocess.Popen(python_script(tmp_path, LAUNCHER), env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, preexec_fn=die_with_parent)
    # (a) a kernel with a live world, started meanwhile
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    pids: set[int] = set()
    try:
        ranks, said = set(), []
        for line in launcher.stdout:
            said.append(line)
            ranks |= {int(p) for p in re.findall(r"RANK PID (\d+)", line)}
            if len(ranks) == 3:
                break
        assert len(ranks) == 3, "the launcher's ranks did not start:\n" + "".join(said)
        pids |= marked(mark)
        launcher.kill()
        launcher.wait()

        kc.wait_for_ready(timeout=60)
        reply = kc.execute_interactive("from mpify import World\nw = World(2)", timeout=60)
        assert reply["content"]["status"] == "ok", reply["content"]
        kernel = km.provisioner.process.pid
        pids |= marked(mark)
        assert len(psutil.Process(kernel).children(recursive=True)) >= 2  # a forkserver, the world's rank
        # as Jupyter kills a kernel (LocalProvisioner.kill): SIGKILL to its whole process group
        os.killpg(os.getpgid(kernel), signal.SIGKILL)
        km.provisioner.process.wait()

        # every process they started exits by itself (forkservers, zygotes, ranks, resource
        # trackers), wherever it was reparented to
        left = wait_gone(pids, 15.0)
        assert not left, f"still running: {left}"
        wait_until(lambda: not marked(mark), 5.0)
        assert not marked(mark), f"still running: {sorted(marked(mark))}"
        found = [(n, os.listdir(tmp / n) if (tmp / n).is_dir() else None) for n in theirs(tmp)]
        assert not found, f"left in TMPDIR: {found}"
    finally:
        kc.stop_channels()
        for pid in set(alive(pids)) | marked(mark):  # only what this test started, by pid
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if launcher.poll() is None:
            launcher.kill()
        if km.has_kernel and km.is_alive():
            km.shutdown_kernel(now=True)
        km.cleanup_resources()
