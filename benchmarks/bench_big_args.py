"""Large arguments: a 256 MB torch tensor and a 256 MB numpy array passed to N ranks.

Compares, in one process, the warm launch of a trivial fn without arguments, with the two
arguments through shared memory (mpify's default), and with them pickled into every rank's
launch (shared memory turned off), and checks that the ranks saw the right data.

    python benchmarks/bench_big_args.py [-n 4] [--mb 256] [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import numpy as np
import torch

from mpify import ranch
from mpify.engine import shm


def touch(*arrays):
    return [float(a[-1]) for a in arrays]


def timed(n, args, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        out = ranch(n, touch, *args, caller_rank=None, gather=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


COLD = """
import time, numpy as np, torch
from mpify import ranch
def touch(*arrays):
    return [float(a[-1]) for a in arrays]
count = {count}
args = (torch.arange(count, dtype=torch.float32), np.arange(count, dtype=np.float32)) if {with_args} else ()
start = time.perf_counter()
ranch({n}, touch, *args, caller_rank=None, gather=True)
print("COLD", time.perf_counter() - start)
"""


def cold(n, count, with_args):
    """The first launch in a fresh process that imported torch (forkserver start included)."""
    out = subprocess.run([sys.executable, "-c", COLD.format(n=n, count=count, with_args=with_args)],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("COLD", 1)[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", "--nprocs", type=int, default=4)
    ap.add_argument("--mb", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    count = a.mb * 1024 * 1024 // 4
    ten = torch.arange(count, dtype=torch.float32)
    arr = np.arange(count, dtype=np.float32)
    ranch(a.nprocs, touch)  # warm the forkserver
    base, _ = timed(a.nprocs, (), a.repeat)
    shared, out = timed(a.nprocs, (ten, arr), a.repeat)
    want = [[float(ten[-1]), float(arr[-1])]] * a.nprocs
    assert out == want, out
    threshold, shm.THRESHOLD = shm.THRESHOLD, float("inf")
    try:
        pickled, out = timed(a.nprocs, (ten, arr), max(1, a.repeat // 2))
    finally:
        shm.THRESHOLD = threshold
    assert out == want
    cold_base = statistics.median(cold(a.nprocs, count, False) for _ in range(3))
    cold_shared = statistics.median(cold(a.nprocs, count, True) for _ in range(3))
    print(f"\nN={a.nprocs}, a {a.mb} MB tensor + a {a.mb} MB array, every rank a child")
    print(f"{'launch':58} {'seconds':>8} {'vs no args':>10}")
    rows = [(f"warm, no arguments (median of {a.repeat})", base, base),
            ("warm, shared memory (default)", shared, base),
            ("warm, pickled to every rank", pickled, base),
            ("first call in a fresh process, no arguments (median of 3)", cold_base, cold_base),
            ("first call in a fresh process, shared memory", cold_shared, cold_base)]
    for name, t, ref in rows:
        print(f"{name:58} {t:8.3f} {t / ref:9.1f}x")


if __name__ == "__main__":
    main()
