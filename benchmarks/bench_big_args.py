"""Large arguments: a 256 MB torch tensor and a 256 MB numpy array passed to N ranks.

Compares, in one process, the warm launch of a trivial fn without arguments, with the two
arguments through shared memory (mpify's default), and with them pickled into every rank's
launch (shared memory turned off), and checks that the ranks saw the right data.

    python benchmarks/bench_big_args.py [-n 4] [--mb 256] [--repeat 5]
"""
from __future__ import annotations

import argparse
import statistics
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
    print(f"\nN={a.nprocs}, a {a.mb} MB tensor + a {a.mb} MB array, every rank a child (median of {a.repeat})")
    print(f"{'launch':40} {'seconds':>8} {'vs no args':>10}")
    for name, t in [("no arguments", base), ("shared memory (default)", shared), ("pickled to every rank", pickled)]:
        print(f"{name:40} {t:8.3f} {t / base:9.1f}x")


if __name__ == "__main__":
    main()
