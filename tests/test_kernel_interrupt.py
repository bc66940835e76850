"""Jupyter's "Interrupt kernel" and "Restart kernel" while ranks are running, in a real kernel."""
import re
import time

import pytest
from jupyter_client.manager import KernelManager

from helpers import alive, wait_gone

LAUNCH = """
import os, time
from mpify import ranch
def stuck():
    print("PID", os.getpid(), flush=True)
    if os.environ["RANK"] != "0":
        import ctypes
        ctypes.CDLL(None).sleep(1000)   # children asleep in C code
    time.sleep(1000)
ranch(3, stuck)
"""


@pytest.fixture
def kernel(kernel_name):
    km = KernelManager(kernel_name=kernel_name)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    yield km, kc
    kc.stop_channels()
    if km.is_alive():
        km.shutdown_kernel(now=True)


def start_ranks(kc):
    """Run the launch cell; return its msg id and the three rank pids once all are running."""
    msg_id = kc.execute(LAUNCH)
    pids = set()
    deadline = time.monotonic() + 60
    while len(pids) < 3 and time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=60)
        if msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "stream":
            pids.update(int(p) for p in re.findall(r"PID (\d+)", msg["content"]["text"]))
    assert len(pids) == 3, pids
    time.sleep(0.5)
    return msg_id, pids


def test_interrupt_kernel_stops_every_rank(kernel):
    km, kc = kernel
    msg_id, pids = start_ranks(kc)
    kernel_pid = km.provisioner.process.pid
    start = time.monotonic()
    km.interrupt_kernel()
    reply = kc.get_shell_msg(timeout=30)
    took = time.monotonic() - start
    assert reply["parent_header"]["msg_id"] == msg_id
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert took < 5, f"took {took:.1f} s"
    assert not alive(pids - {kernel_pid})
    # The kernel launches again as usual afterwards.
    kc.execute("r = ranch(2, lambda: 7)")
    assert kc.get_shell_msg(timeout=60)["content"]["status"] == "ok"


def test_restart_kernel_takes_ranks_along(kernel):
    km, kc = kernel
    _, pids = start_ranks(kc)
    kernel_pid = km.provisioner.process.pid
    km.restart_kernel(now=True)  # SIGKILL to the kernel, as JupyterLab's "Restart" does
    left = wait_gone(pids - {kernel_pid}, 5.0)
    assert not left, f"ranks outlived the kernel: {left}"
