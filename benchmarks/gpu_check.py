"""GPU check: mpify after the caller has initialised CUDA (which breaks fork-based launchers).

Run on a machine with at least one NVIDIA GPU:

    python benchmarks/gpu_check.py [-n NPROCS] [--repeat 5]

1. The caller allocates on CUDA first (as a notebook that already trained something has).
2. torchddp_launch with CUDA tensors: nccl when every rank has its own GPU (n <= GPU count),
   then gloo on CUDA tensors with 2 ranks (any GPU count).
3. First and warm launch times for each, and fork's behaviour for comparison.
4. A torchrun-style DDP function (its own gloo group, a DDP model on the GPU, 20 steps, destroy)
   launched again and again after the caller used CUDA: first and warm.
5. A 256 MB CUDA tensor as an argument (sent as a CUDA IPC handle, copied in each rank) next to the
   same launch without it (goal: at most 1.5x), and a pinned tensor that must arrive pinned.
6. A live world on the GPU: nccl with one rank, and gloo with two ranks sharing the GPU: start, a
   cell's all_reduce on CUDA tensors, an interrupt during a loop of collectives (same ranks after),
   stop (every rank gone).
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


def ddp_train_on_gpu():
    """Written as for torchrun: its own group, DDP on the rank's GPU (one GPU: ranks share it)."""
    import os

    import torch.nn as nn
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo")
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]) % torch.cuda.device_count())
    model = DDP(nn.Linear(64, 1).to(device))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for _ in range(20):
        opt.zero_grad()
        loss = model(torch.randn(16, 64, device=device)).pow(2).mean()
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    dist.destroy_process_group()
    return "gloo", str(device), 1


def touch(*tensors):
    """Each argument's last element, and whether the pinned ones arrived pinned."""
    return [(str(t.device), float(t[-1]), t.is_pinned() if t.device.type == "cpu" else None) for t in tensors]


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


ALLREDUCE_CELL = ("import torch, torch.distributed as dist\n"
                  "t = torch.ones(4, device='cuda') * (dist.get_rank() + 1)\ndist.all_reduce(t)\n"
                  "torch.cuda.synchronize()\n(dist.get_backend(), t[0].item())")


def world_on_gpu(n: int, backend: str) -> tuple[float, float, str]:
    """Start a world, run a CUDA all_reduce cell, interrupt a loop of them, run it again, stop."""
    import os
    import signal
    import threading

    import psutil

    from mpify import World

    start = time.monotonic()
    w = World(n, ddp=True, backend=backend)
    started = time.monotonic() - start
    try:
        pids = [row["pid"] for row in w.status()]
        t0 = time.monotonic()
        first = w.exec(ALLREDUCE_CELL)
        cell = time.monotonic() - t0
        timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            w.exec("for _ in range(100000):\n    dist.all_reduce(t)\n    torch.cuda.synchronize()")
            interrupted = "not interrupted"
        except KeyboardInterrupt:
            interrupted = "interrupted"
        again = w.exec(ALLREDUCE_CELL)
        same = [row["pid"] for row in w.status()] == pids
    finally:
        w.close()
    left = [pid for pid in pids[1:] if psutil.pid_exists(pid)]
    want = (backend, float(sum(range(1, n + 1))))
    good = first == want and again == want and interrupted == "interrupted" and same and not left
    return started, cell, "ok" if good else f"WRONG {first} {again} {interrupted} same={same} left={left}"


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
    checks = [(f"torchrun-style DDP on GPU, {world} ranks, 20 steps",
               lambda: ranch(world, ddp_train_on_gpu, gather=True), None)]
    big = torch.full((64 << 20,), 7.0, device="cuda")  # 256 MB
    pinned = torch.full((64 << 20,), 3.0).pin_memory()
    checks += [("no arguments, 2 ranks (all children)", lambda: ranch(2, touch, caller_rank=None, gather=True),
                [[], []]),
               ("256 MB CUDA tensor argument, 2 ranks", lambda: ranch(2, touch, big, caller_rank=None, gather=True),
                [[("cuda:0", 7.0, None)]] * 2),
               ("256 MB pinned tensor argument, 2 ranks", lambda: ranch(2, touch, pinned, caller_rank=None, gather=True),
                [[("cpu", 3.0, True)]] * 2)]
    for name, launch, expected in checks:
        try:
            result, times = timed(launch, a.repeat)
            good = expected is None and all(r[0] == "gloo" for r in result) or result == expected
            rows.append((name, times[0], statistics.median(times[1:]), "ok" if good else f"WRONG {result}"))
            ok &= good
        except Exception as exc:
            rows.append((name, float("nan"), float("nan"), f"FAILED {type(exc).__name__}: {exc}"[:120]))
            ok = False
    by_name = {r[0]: r[2] for r in rows}
    ratio = by_name["256 MB CUDA tensor argument, 2 ranks"] / by_name["no arguments, 2 ranks (all children)"]
    rows.append(("CUDA argument vs none (goal <= 1.5x)", float("nan"), ratio, "ok" if ratio <= 1.5 else "SLOW"))
    rows.append(("fork after CUDA init (for comparison)", float("nan"), float("nan"), fork_after_cuda(2)))
    for name, n_world, backend in (("live world, nccl, 1 rank", 1, "nccl"), ("live world, gloo, 2 ranks on one GPU", 2, "gloo")):
        try:  # columns: the world's start, and one all_reduce cell
            started, cell, res = world_on_gpu(n_world, backend)
        except Exception as exc:
            started, cell, res = float("nan"), float("nan"), f"FAILED {type(exc).__name__}: {exc}"[:120]
        rows.append((name, started, cell, res))
        ok &= res == "ok"
    print(f"{'check':42} {'first (s)':>10} {'warm (s)':>9}  result")
    for name, first, warm, res in rows:
        print(f"{name:42} {first:10.3f} {warm:9.3f}  {res}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
