"""Jupyter's "Interrupt kernel" and "Restart kernel" while ranks are running, in a real kernel."""
import re
import time

import pytest

from conftest import jupyter_kernel
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


@pytest.fixture(scope="module")
def kernel(kernel_name):
    """One kernel for both tests: interrupted first (and launching again after), then restarted."""
    with jupyter_kernel(kernel_name) as (km, kc):
        yield km, kc


def shell_reply(kc, msg_id, timeout):
    """The reply to `msg_id` (wait_for_ready may leave an extra kernel_info reply before it)."""
    deadline = time.monotonic() + timeout
    while True:
        reply = kc.get_shell_msg(timeout=max(0.1, deadline - time.monotonic()))
        if reply["parent_header"].get("msg_id") == msg_id:
            return reply


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
    reply = shell_reply(kc, msg_id, 30)
    took = time.monotonic() - start
    assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
    assert took < 5, f"took {took:.1f} s"
    assert not alive(pids - {kernel_pid})
    # The kernel launches again as usual afterwards. ipykernel aborts the requests that reach it
    # while it still handles the error (its stop_on_error window, longer under load: "aborted",
    # not run); a user runs the next cell once the kernel shows idle, and again if it was aborted.
    wait_idle(kc, msg_id, 30)
    for _ in range(3):
        again = kc.execute("r = ranch(2, lambda: 7)")
        status = shell_reply(kc, again, 60)["content"]["status"]
        if status != "aborted":
            break
        time.sleep(0.5)
    assert status == "ok"


def wait_idle(kc, msg_id, timeout):
    """Until the kernel's iopub says it is idle after the request `msg_id`."""
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if (msg["parent_header"].get("msg_id") == msg_id and msg["msg_type"] == "status"
                and msg["content"]["execution_state"] == "idle"):
            return


def test_restart_kernel_takes_ranks_along(kernel):
    km, kc = kernel
    _, pids = start_ranks(kc)
    kernel_pid = km.provisioner.process.pid
    km.restart_kernel(now=True)  # SIGKILL to the kernel, as JupyterLab's "Restart" does
    left = wait_gone(pids - {kernel_pid}, 5.0)
    assert not left, f"ranks outlived the kernel: {left}"
