"""How soon the caller, blocked as rank 0 in a gloo all_reduce, learns that rank 1 was SIGKILLed.

    python benchmarks/bench_failure_latency.py [--runs 5]
"""
import argparse
import os
import signal
import tempfile
import time

import torch
import torch.distributed as dist

from mpify import RankDiedError, ranch


def killed_while_others_wait(path):
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        time.sleep(0.5)
        with open(path, "w") as f:
            f.write(repr(time.monotonic()))  # CLOCK_MONOTONIC is system-wide on Linux
        os.kill(os.getpid(), signal.SIGKILL)
    t = torch.ones(1)
    dist.all_reduce(t)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    path = os.path.join(tempfile.mkdtemp(), "killed-at")
    delays = []
    for _ in range(a.runs):
        try:
            ranch(3, killed_while_others_wait, path)
        except RankDiedError:
            delays.append(time.monotonic() - float(open(path).read()))
    print("seconds from the SIGKILL to RankDiedError in the caller:", ", ".join(f"{d:.3f}" for d in delays))


if __name__ == "__main__":
    main()
