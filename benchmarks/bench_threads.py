"""What one thread per rank buys: the DDP workload (`_workers.ddp_train`: its own group, DDP,
20 steps) on N ranks, each launch's ranks set to 1 thread (mpify's default when N > 1) or to
torch's default here (one per CPU, what the ranks had before), alternated launch by launch in
one process, so that a shared machine's load hits both alike.

    python benchmarks/bench_threads.py [-n 4] [--repeat 15]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402,F401  (imported first, as in a notebook doing PyTorch work)

import _workers  # noqa: E402
from _machine import machine  # noqa: E402
from mpify import ranch  # noqa: E402


def work(threads: int) -> float:
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad")
    torch.set_num_threads(threads)
    return _workers.ddp_train()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--nprocs", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=15)
    a = ap.parse_args()
    default = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    counts = (1, default)
    for k in counts:  # warm: the forkserver, torch._dynamo, the first group
        ranch(a.nprocs, work, k, show_ranks=[])
    times: dict[int, list[float]] = {k: [] for k in counts}
    for _ in range(a.repeat):
        for k in counts:
            t = time.perf_counter()
            ranch(a.nprocs, work, k, show_ranks=[])
            times[k].append(time.perf_counter() - t)
    print(f"machine: {machine()}; load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
    for k in counts:
        ts = times[k]
        print(f"N={a.nprocs}, {k} thread(s) per rank: median {statistics.median(ts):.3f} s, "
              f"min {min(ts):.3f} s ({len(ts)} launches)")


if __name__ == "__main__":
    main()
