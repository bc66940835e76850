"""Launch time of mpify's ranch next to the launchers PyTorch users know.

Each launcher runs in a fresh Python process that has imported torch (as a notebook doing
PyTorch work has): the first call there is the cold launch, the following ones the warm launch.
Peers are measured when installed and skipped otherwise: torch.multiprocessing.spawn,
torchrun's engine (torch.distributed.launcher.elastic_launch), and accelerate's
notebook_launcher (fork). Prints a table of medians and ratios to mpify; `--png FILE` draws it.

    python benchmarks/bench_launch.py -n 4 --repeat 5 [--fn trivial|gloo_allreduce] [--png out.png]
"""
from __future__ import annotations

import argparse
import os
import statistics
import textwrap

from _fresh import fresh_times
from _machine import machine

HERE = os.path.dirname(os.path.abspath(__file__))

RUNNERS = {
    "mpify ranch": """
        from mpify import ranch
        def launch():
            ranch(N, getattr(_workers, FN))
    """,
    "torch.mp.spawn": """
        import socket
        import torch.multiprocessing as tmp
        def launch():
            with socket.socket() as s:  # a free port per launch, as mpify picks one
                s.bind(("", 0))
                os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
            tmp.spawn(_workers.spawn_entry, args=(FN, N), nprocs=N, join=True)
    """,
    "torchrun engine (elastic_launch)": """
        from torch.distributed.launcher.api import LaunchConfig, elastic_launch
        import uuid
        def launch():
            cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=N, run_id=str(uuid.uuid4()),
                               rdzv_backend="c10d", rdzv_endpoint="127.0.0.1:0", max_restarts=0,
                               monitor_interval=0.1, start_method="spawn")
            elastic_launch(cfg, getattr(_workers, FN))()
    """,
    "accelerate notebook_launcher": """
        from accelerate import notebook_launcher
        def launch():
            notebook_launcher(getattr(_workers, FN), (), num_processes=N)
    """,
}

PRELUDE = """
import json, os, sys, time
sys.path.insert(0, {here!r})
import torch
import _workers
N, FN, REPEAT = {n}, {fn!r}, {repeat}
"""

MAIN = """
times = []
for _ in range(REPEAT + 1):
    t = time.perf_counter()
    launch()
    times.append(time.perf_counter() - t)
print("TIMES", json.dumps(times))
"""


def measure(name: str, n: int, fn: str, repeat: int) -> list[float] | str:
    return fresh_times(PRELUDE.format(here=HERE, n=n, fn=fn, repeat=repeat) + textwrap.dedent(RUNNERS[name]) + MAIN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--nprocs", type=int, default=4)
    ap.add_argument("--fn", default="gloo_allreduce", choices=["trivial", "gloo_allreduce"])
    ap.add_argument("--repeat", type=int, default=5, help="warm calls after the first")
    ap.add_argument("--only", nargs="*", help="launchers to run (default: all)")
    ap.add_argument("--png", help="write a bar chart here (needs matplotlib)")
    a = ap.parse_args()
    names = [k for k in RUNNERS if not a.only or any(o in k for o in a.only)]
    rows = {name: measure(name, a.nprocs, a.fn, a.repeat) for name in names}
    base = rows.get("mpify ranch")
    print(f"\nLaunch time, N={a.nprocs}, fn={a.fn}; {machine()}")
    print(f"{'launcher':36} {'first (s)':>10} {'warm median (s)':>16} {'warm vs mpify':>14}")
    for name, t in rows.items():
        if isinstance(t, str):
            print(f"{name:36} {t}")
            continue
        warm = statistics.median(t[1:])
        ratio = warm / statistics.median(base[1:]) if isinstance(base, list) else float("nan")
        print(f"{name:36} {t[0]:10.3f} {warm:16.3f} {ratio:13.1f}x")
    if a.png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ok = {k: v for k, v in rows.items() if isinstance(v, list)}
        fig, ax = plt.subplots(figsize=(8, 3.5))
        y = range(len(ok))
        ax.barh([i + 0.2 for i in y], [v[0] for v in ok.values()], 0.4, label="first call")
        ax.barh([i - 0.2 for i in y], [statistics.median(v[1:]) for v in ok.values()], 0.4, label="warm (median)")
        ax.set_yticks(list(y), list(ok))
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log scale)")
        ax.set_title(f"Launch of {a.nprocs} ranks, {a.fn}")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.png, dpi=110)
        print(f"chart written to {a.png}")


if __name__ == "__main__":
    main()
