"""Many launches in one process (a notebook session) leave nothing behind."""
import os
import threading
import time

import psutil
import pytest

from helpers import strays
from mpify import ranch

torch = pytest.importorskip("torch")


def allreduce():
    import torch.distributed as dist
    dist.init_process_group("gloo")
    t = torch.ones(1) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    dist.destroy_process_group()
    return t.item()


def fails_in_rank_1():
    if os.environ["RANK"] == "1":
        raise ValueError("planned")
    return 0


def snapshot():
    me = psutil.Process()
    return {
        "fds": sorted(os.listdir("/proc/self/fd")),
        "threads": me.num_threads(),
        "python_threads": sorted(t.name for t in threading.enumerate()),
        "environ": dict(os.environ),
        "processes": sorted(p.pid for p in strays()),
    }


def test_fifty_launches_leave_nothing_behind():
    from mpify.engine.start import forkserver, pool

    assert ranch(3, allreduce) == 6.0  # warm up: forkserver, resource tracker
    # The complete forkserver (started after the warm-up when a quick one served it, or when an
    # earlier test's imports changed the package set) takes over before the counting starts: its
    # pipes are not the launches'. What it replaced retires once the next launch is served, and
    # is reaped by a thread that ends when it exits: waited for, not counted.
    pool.wait_complete()
    assert ranch(3, allreduce) == 6.0
    for reaper in list(forkserver._reapers):
        reaper.join(10)
    # The warm-up's joined threads may still be leaving /proc: counted once they have.
    settled, deadline = psutil.Process().num_threads(), time.monotonic() + 1.0
    while time.monotonic() < deadline:
        time.sleep(0.1)
        if psutil.Process().num_threads() == settled:
            break
        settled = psutil.Process().num_threads()
    before = snapshot()
    for i in range(50):
        if i % 10 == 9:
            with pytest.raises(ValueError, match="planned"):
                ranch(3, fails_in_rank_1)
        else:
            assert ranch(3, allreduce) == 6.0
    after = snapshot()
    assert after["processes"] == before["processes"] == []
    assert after["environ"] == before["environ"]
    assert after["python_threads"] == before["python_threads"]
    # A joined thread's OS thread may take a moment more to vanish from /proc.
    deadline = time.monotonic() + 1.0
    while psutil.Process().num_threads() > before["threads"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert psutil.Process().num_threads() == before["threads"]
    assert after["fds"] == before["fds"]
