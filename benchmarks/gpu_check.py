"""GPU check: mpify after the caller has initialised CUDA (which breaks fork-based launchers).

Run on a machine with at least one NVIDIA GPU:

    python benchmarks/gpu_check.py [-n NPROCS] [--repeat 5]

1. The caller allocates on CUDA first (as a notebook that already trained something has).
2. torchddp_launch with CUDA tensors: nccl when every rank has its own GPU (n <= GPU count),
   then gloo on CUDA tensors with 2 ranks (any GPU count).
3. First and warm launch times for each, and fork's behaviour for comparison.
Prints one table; exits non-zero if any check fails.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torch.distributed as dist

from mpify import TorchDDPCtx, ranch, torchddp_launch


def allreduce_on_gpu():
    device = torch.device("cuda", torch.cuda.current_device())
    t = torch.ones(4, device=device) * (dist.get_rank() + 1)
    dist.all_reduce(t)
    torch.cuda.synchronize()
    return dist.get_backend(), str(t.device), t[0].item()


def timed(launch, repeat):
    times, result = [], None
    for _ in range(repeat + 1):
        start = time.perf_counter()
        result = launch()
        times.append(time.perf_counter() - start)
    return result, times


def fork_after_cuda(n):
    """What fork-based launchers meet once the parent touched CUDA."""
    import torch.multiprocessing as tmp

    def child(i):
        torch.zeros(1, device="cuda")
    try:
        tmp.start_processes(child, nprocs=n, start_method="fork")
        return "worked"
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[-1][:90]}"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("-n", "--nprocs", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check")
        return 0
    gpus = torch.cuda.device_count()
    n = a.nprocs or gpus
    torch.zeros(1, device="cuda")  # the caller has now initialised CUDA
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA initialised in the caller")
    rows, ok = [], True
    world = 2
    checks = [(f"gloo on CUDA tensors, {world} ranks",
               lambda: ranch(world, allreduce_on_gpu, ctx=TorchDDPCtx(backend="gloo"), gather=True),
               ("gloo", sum(range(1, world + 1))))]
    if n <= gpus:
        checks.insert(0, (f"nccl, {n} ranks (auto backend)", lambda: torchddp_launch(n, allreduce_on_gpu, gather=True),
                          ("nccl", sum(range(1, n + 1)))))
    for name, launch, (backend, total) in checks:
        try:
            result, times = timed(launch, a.repeat)
            good = all(r[0] == backend and r[2] == total for r in result)
            rows.append((name, times[0], statistics.median(times[1:]), "ok" if good else f"WRONG {result}"))
            ok &= good
        except Exception as exc:
            rows.append((name, float("nan"), float("nan"), f"FAILED {type(exc).__name__}: {exc}"[:120]))
            ok = False
    rows.append(("fork after CUDA init (for comparison)", float("nan"), float("nan"), fork_after_cuda(2)))
    print(f"{'check':42} {'first (s)':>10} {'warm (s)':>9}  result")
    for name, first, warm, res in rows:
        print(f"{name:42} {first:10.3f} {warm:9.3f}  {res}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
