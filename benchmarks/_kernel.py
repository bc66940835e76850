"""A real Jupyter kernel for the benchmarks, driven with jupyter_client as tests/test_world_kernel.py
does, and timed the way a user waits for a cell: from the execute request to the kernel's idle
status on iopub.

The kernel runs this very interpreter (a kernelspec with `sys.executable -m ipykernel_launcher`),
with a PATH whose first entry holds a stand-in `pkill` that only logs: a peer's clean-up path
(nbdistributed's) runs `pkill -f` with broad patterns across the machine, and must not reach
other people's processes. Every process the kernel started is recorded, so that the caller can
check that none is left (and end those it must, by PID).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import psutil

PKILL_STUB = """#!/bin/sh
# A stand-in for pkill: logs what it was asked, kills nothing.
echo "pkill $*" >> "{log}"
exit 1
"""


class Cell:
    def __init__(self, status: str, took: float, msgs: list):
        self.status, self.took, self.msgs = status, took, msgs
        self.stdout = "".join(m["content"]["text"] for m in msgs
                              if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        self.stderr = "".join(m["content"]["text"] for m in msgs
                              if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
        self.errors = [f"{m['content']['ename']}: {m['content']['evalue']}" for m in msgs if m["msg_type"] == "error"]

    @property
    def ok(self) -> bool:
        return self.status == "ok" and not self.errors

    def why(self) -> str:
        text = "; ".join(self.errors) or (self.stderr.strip().splitlines() or self.stdout.strip().splitlines()
                                          or [self.status])[-1]
        return text[:100]


class Kernel:
    """One ipykernel of this interpreter; `run(code)` returns a timed Cell."""

    def __init__(self, cwd: str | None = None):
        from jupyter_client.manager import KernelManager

        self.root = tempfile.mkdtemp(prefix="bench_world_")
        spec = os.path.join(self.root, "kernels", "bench-world")
        os.makedirs(spec)
        with open(os.path.join(spec, "kernel.json"), "w") as f:
            json.dump({"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                       "display_name": "bench world", "language": "python"}, f)
        bindir = os.path.join(self.root, "bin")
        os.makedirs(bindir)
        self.pkill_log = os.path.join(self.root, "pkill.log")
        stub = os.path.join(bindir, "pkill")
        with open(stub, "w") as f:
            f.write(PKILL_STUB.format(log=self.pkill_log))
        os.chmod(stub, 0o755)
        env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE")}
        # the stand-in first, then this interpreter's bin (a peer that starts "python" gets this venv's)
        env["PATH"] = os.pathsep.join([bindir, os.path.dirname(sys.executable), env.get("PATH", "")])
        env["JUPYTER_PATH"] = self.root + (os.pathsep + env["JUPYTER_PATH"] if env.get("JUPYTER_PATH") else "")
        old = os.environ.get("JUPYTER_PATH")
        os.environ["JUPYTER_PATH"] = env["JUPYTER_PATH"]  # where KernelManager looks up the spec
        try:
            # ipc, not tcp: no port picked then released for another process to take (the
            # kernel's heartbeat thread died of "Address already in use" once under load)
            self.km = KernelManager(kernel_name="bench-world", transport="ipc",
                                    connection_file=os.path.join(self.root, "kernel.json"))
            self.km.start_kernel(env=env, cwd=cwd or os.getcwd())
        finally:
            if old is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = old
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.pid = self.km.provisioner.process.pid
        self.seen: dict[int, psutil.Process] = {}  # every descendant ever seen, by pid
        self._pkill: list[str] | None = None  # the stand-in's log, read before the folder goes

    def run(self, code: str, timeout: float = 300) -> Cell:
        kc = self.kc
        start = time.perf_counter()
        msg_id = kc.execute(code)
        deadline = time.monotonic() + timeout
        msgs = []
        while True:
            msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                break
            msgs.append(msg)
        took = time.perf_counter() - start
        reply = kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
        self.record()
        return Cell(reply["content"]["status"], took, msgs)

    def children(self) -> list[psutil.Process]:
        try:
            return psutil.Process(self.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def record(self) -> None:
        for p in self.children():
            self.seen.setdefault(p.pid, p)

    def pkill_calls(self) -> list[str]:
        if self._pkill is not None:
            return self._pkill
        try:
            with open(self.pkill_log) as f:
                return f.read().splitlines()
        except OSError:
            return []

    def shutdown(self, kill_children: bool = False) -> None:
        """Shut the kernel down as Jupyter does (a shutdown request); with kill_children, first end
        every process it started by PID (for a peer that would leave them)."""
        self.record()
        if kill_children:
            kill(list(self.seen.values()))
        try:
            self.kc.stop_channels()
        finally:
            if self.km.is_alive():
                self.km.shutdown_kernel(now=False)
            self._pkill = self.pkill_calls()
            shutil.rmtree(self.root, ignore_errors=True)

    def left(self, grace: float = 5.0) -> list[psutil.Process]:
        """Processes this kernel started that still run (zombies aside), after up to `grace` s."""
        deadline = time.monotonic() + grace
        while True:
            left = [p for p in self.seen.values() if running(p)]
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)


def running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill(procs: list[psutil.Process]) -> None:
    for p in procs:
        try:
            if p.is_running():  # is_running also checks the pid was not reused
                p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)
