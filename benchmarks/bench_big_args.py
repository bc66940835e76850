"""Large arguments: a 256 MB torch tensor and a 256 MB numpy array passed to N ranks.

Compares the launch of a trivial fn without arguments to the same launch with the two arguments:
- first call in a fresh process (forkserver start included), run before anything else so that
  every fresh process meets the same machine;
- warm calls in one process: snapshots kept between launches (mpify's default), a few pages
  written between launches, the snapshot cache turned off (a full copy into shared memory every
  launch), and pickled into every rank's launch (shared memory turned off).
Every row checks that the ranks saw the caller's data as it was at the call. Then the peers that
are installed get the same two arguments, each in its own fresh process, warm calls timed.

    python benchmarks/bench_big_args.py [-n 4] [--mb 256] [--repeat 5] [--no-peers]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _fresh import fresh_times

# numpy, torch and mpify are imported only after the first-call rows: on the VM these figures come
# from, a parent that had imported torch made its children's first touches of fresh memory slower
# (1.05-1.42 s against 0.98 s for the same child). A Jupyter server, the real parent, has not.
np = torch = ranch = shm = None


def touch(*arrays):
    return [float(a[-1]) for a in arrays]


COLD = """
import time, numpy as np, torch
from mpify import ranch
def touch(*arrays):
    return [float(a[-1]) for a in arrays]
count = {count}
args = (torch.arange(count, dtype=torch.float32), np.arange(count, dtype=np.float32)) if {with_args} else ()
start = time.perf_counter()
out = ranch({n}, touch, *args, caller_rank=None, gather=True)
took = time.perf_counter() - start
assert out == [[float(a[-1]) for a in args]] * {n}, out
print("COLD", took)
"""


def cold(n, count, with_args):
    """The first launch in a fresh process that imported torch (forkserver start included)."""
    out = subprocess.run([sys.executable, "-c", COLD.format(n=n, count=count, with_args=with_args)],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("COLD", 1)[1])


PEER = """
import json, os, socket, statistics, sys, time
sys.path.insert(0, {here!r})
import numpy as np, torch
import _workers
N, COUNT, REPEAT = {n}, {count}, {repeat}
ten = torch.arange(COUNT, dtype=torch.float32)
arr = np.arange(COUNT, dtype=np.float32)
{launch}
def timed(args):
    out = []
    for _ in range(REPEAT):
        t = time.perf_counter()
        launch(args)
        out.append(time.perf_counter() - t)
    return statistics.median(out)
launch(())  # first calls: imports, forkservers
launch((ten, arr))
print("TIMES", json.dumps([timed(()), timed((ten, arr))]))
"""

PEERS = {
    "mpify ranch (children only)": """
from mpify import ranch
def launch(args):
    assert ranch(N, _workers.touch, *args, caller_rank=None, gather=True) == [_workers.touch(*args)] * N
""",
    "accelerate notebook_launcher (fork)": """
from accelerate import notebook_launcher
def launch(args):
    notebook_launcher(_workers.touch, args, num_processes=N)
""",
    "torchrun engine (elastic_launch, spawn)": """
import uuid
from torch.distributed.launcher.api import LaunchConfig, elastic_launch
def launch(args):
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=N, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                       monitor_interval=0.1, start_method="spawn")
    elastic_launch(cfg, _workers.touch)(*args)
""",
    "torch.multiprocessing.spawn": """
import torch.multiprocessing as tmp
def launch(args):
    with socket.socket() as s:
        s.bind(("", 0))
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
    tmp.spawn(_workers.spawn_touch, args=args, nprocs=N, join=True)
""",
}


def peer(name, n, count, repeat):
    return fresh_times(PEER.format(here=os.path.dirname(os.path.abspath(__file__)), n=n, count=count,
                                   repeat=repeat, launch=PEERS[name]), timeout=900)


def warm(n, args, repeat, between=None):
    """Median seconds of `repeat` launches, and the median bytes copied into shared memory."""
    times, copied = [], []
    for i in range(repeat):
        if between:
            between(i)
        start = time.perf_counter()
        out = ranch(n, touch, *args, caller_rank=None, gather=True)
        times.append(time.perf_counter() - start)
        copied.append(shm.last_launch["copied"] if args else 0)
        assert out == [touch(*args)] * n, out
    return statistics.median(times), statistics.median(copied)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", "--nprocs", type=int, default=4)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--no-peers", dest="peers", action="store_false")
    a = ap.parse_args()
    count = a.mb * 1024 * 1024 // 4

    cold_base, cold_shared = [], []
    for _ in range(3):  # alternate, so that both meet the machine in the same state
        cold_base.append(cold(a.nprocs, count, False))
        cold_shared.append(cold(a.nprocs, count, True))

    global np, torch, ranch, shm
    import numpy as np
    import torch

    from mpify import ranch
    from mpify.engine.args import shm
    from _machine import machine

    ten = torch.arange(count, dtype=torch.float32)
    arr = np.arange(count, dtype=np.float32)
    ranch(a.nprocs, touch)  # warm the forkserver
    base = warm(a.nprocs, (), a.repeat)
    warm(a.nprocs, (ten, arr), 1)  # the first launch with them makes the snapshots
    kept = warm(a.nprocs, (ten, arr), a.repeat)

    def scribble(i):  # 10 scattered elements of each, as an optimizer step on a few rows would
        idx = np.linspace(0, count - 1, 10).astype(np.int64)
        ten[torch.from_numpy(idx)] = i
        arr[idx] = i
        arr[-1] = ten[-1] = count + i  # what touch reads
    written = warm(a.nprocs, (ten, arr), a.repeat, scribble)
    os.environ["MPIFY_SHM_CACHE_MB"] = "0"
    try:
        copied = warm(a.nprocs, (ten, arr), a.repeat)
        threshold, shm.THRESHOLD = shm.THRESHOLD, float("inf")
        try:
            pickled = warm(a.nprocs, (ten, arr), max(1, a.repeat // 2))
        finally:
            shm.THRESHOLD = threshold
    finally:
        del os.environ["MPIFY_SHM_CACHE_MB"]

    print(f"\nN={a.nprocs}, a {a.mb} MB tensor + a {a.mb} MB array, every rank a child; {machine()}")
    print(f"{'launch':62} {'seconds':>8} {'vs no args':>10} {'MB to shm':>10}")
    rows = [(f"warm, no arguments (median of {a.repeat})", base, base[0]),
            ("warm, snapshots kept between launches (default)", kept, base[0]),
            ("warm, 10 elements of each written before every launch", written, base[0]),
            ("warm, cache off (MPIFY_SHM_CACHE_MB=0): full copy each launch", copied, base[0]),
            ("warm, pickled to every rank", pickled, base[0]),
            ("first call in a fresh process, no arguments (median of 3)", (statistics.median(cold_base), 0), None),
            ("first call in a fresh process, with them", (statistics.median(cold_shared), 2 * a.mb << 20), None)]
    cold_ref = statistics.median(cold_base)
    for name, (t, nbytes), ref in rows:
        ref = cold_ref if ref is None else ref
        print(f"{name:62} {t:8.3f} {t / ref:9.2f}x {nbytes / 2**20:10.2f}")
    if not a.peers:
        return
    ten = arr = None  # free them before the peers run
    print(f"\nWarm launches, each launcher in its own fresh process, median of {a.repeat}")
    print(f"{'launcher':40} {'no args (s)':>12} {'with them (s)':>14} {'ratio':>7}")
    for name in PEERS:
        got = peer(name, a.nprocs, count, a.repeat)
        if isinstance(got, str):
            print(f"{name:40} {got}")
        else:
            print(f"{name:40} {got[0]:12.3f} {got[1]:14.3f} {got[1] / got[0]:6.2f}x")


if __name__ == "__main__":
    main()

