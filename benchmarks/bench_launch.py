"""Launch time of mpify's ranch next to the launchers PyTorch users know.

Each launcher runs in a fresh Python process that has imported torch (as a notebook doing
PyTorch work has): the first call there is the cold launch, the following ones the warm launch.
Peers are measured when installed and skipped otherwise: torch.multiprocessing.spawn,
torchrun's engine (torch.distributed.launcher.elastic_launch), and accelerate's
notebook_launcher (fork). Prints a table of medians and ratios to mpify; `--png FILE` draws it.

    python benchmarks/bench_launch.py -n 4 --repeat 5 [--fn trivial|gloo_allreduce|ddp_train] [--png out.png]
    python benchmarks/bench_launch.py --ddp-workload [--png out.png]
    python benchmarks/bench_launch.py --first [--repeat 3]

`--ddp-workload` is the table for the real workload: for N=2 and 4, mpify's warm gloo
init+all_reduce (the trivial launch), then `ddp_train` (a torchrun-style function: its own group,
DDP, 20 steps, destroy) under mpify, accelerate and torch.multiprocessing.spawn.

`--first` is the first launch of a session (N=4, gloo init + all_reduce), right after the launcher's
import and 3 s after it (a notebook's rhythm), each in a fresh process that imported torch first:
mpify in a script (its first launch forks the script itself, the zygote; and without it), and in
a real Jupyter kernel (`import mpify` starts the forkservers; a launch before they are ready forks
the kernel), with accelerate beside them. Medians of `--repeat` fresh processes (kernels).
"""
from __future__ import annotations

import argparse
import json
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


FIRST = """
import json, os, sys, time
sys.path.insert(0, {here!r})
import torch
import _workers
N, FN = {n}, {fn!r}
{imports}
time.sleep({pause})
times = []
for _ in range(2):
    t = time.perf_counter()
    launch()
    times.append(time.perf_counter() - t)
print("TIMES", json.dumps(times))
"""

KERNEL = "in a kernel"  # a key of FIRST_RUNNERS' environments: run the code in a Jupyter kernel

FIRST_RUNNERS = {  # (launcher, session): (import and launch code, environment)
    ("mpify ranch", "script"): ("from mpify import ranch\nlaunch = lambda: ranch(N, getattr(_workers, FN))",
                                {"MPIFY_PREWARM": "0"}),
    ("mpify ranch", "script, no zygote"): ("from mpify import ranch\nlaunch = lambda: ranch(N, getattr(_workers, FN))",
                                           {"MPIFY_PREWARM": "0", "MPIFY_ZYGOTE": "0"}),
    # A real Jupyter kernel (benchmarks/_kernel.py), the code run as one cell: `import mpify`
    # starts the forkservers there, and a launch before they are ready forks the kernel.
    ("mpify ranch", "notebook (kernel)"): ("from mpify import ranch\nlaunch = lambda: ranch(N, getattr(_workers, FN))",
                                           {KERNEL: "1"}),
    ("accelerate notebook_launcher", "any"): ("from accelerate import notebook_launcher\n"
                                              "launch = lambda: notebook_launcher(getattr(_workers, FN), (), num_processes=N)",
                                              {}),
}


def kernel_times(code: str) -> list | str:
    """fresh_times, with the code run as a cell of a new Jupyter kernel."""
    from _kernel import Kernel

    k = Kernel()
    try:
        cell = k.run(code)
    finally:
        k.shutdown()
    for line in cell.stdout.splitlines():
        if line.startswith("TIMES "):
            return json.loads(line[6:])
    return "failed: " + cell.why()[:60]


def first_launch(n: int, fn: str, repeat: int) -> None:
    rows = {}
    for (name, session), (imports, env) in FIRST_RUNNERS.items():
        for pause in (0, 3):
            code = FIRST.format(here=HERE, n=n, fn=fn, imports=imports, pause=pause)
            runs = [kernel_times(code) if KERNEL in env else fresh_times(code, env_extra=env) for _ in range(repeat)]
            ok = [r for r in runs if isinstance(r, list)]
            rows[name, session, pause] = (ok, next((r for r in runs if isinstance(r, str)), None))
    print(f"\nFirst launch of a session, N={n}, fn={fn}, fresh process with torch imported, median of "
          f"{repeat}; {machine()}")
    print(f"{'launcher':30} {'session':20} {'right after import (s)':>23} {'3 s after (s)':>14} {'2nd launch (s)':>15}")
    for name, session in FIRST_RUNNERS:
        cells = []
        for pause in (0, 3):
            ok, why = rows[name, session, pause]
            cells.append(f"{statistics.median(r[0] for r in ok):.3f}" if ok else (why or "failed")[:14])
        ok = rows[name, session, 3][0] or rows[name, session, 0][0]
        second = f"{statistics.median(r[1] for r in ok):.3f}" if ok else "-"
        print(f"{name:30} {session:20} {cells[0]:>23} {cells[1]:>14} {second:>15}")


def measure(name: str, n: int, fn: str, repeat: int) -> list[float] | str:
    return fresh_times(PRELUDE.format(here=HERE, n=n, fn=fn, repeat=repeat) + textwrap.dedent(RUNNERS[name]) + MAIN)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", "--nprocs", type=int, default=4)
    ap.add_argument("--fn", default="gloo_allreduce", choices=["trivial", "gloo_allreduce", "ddp_train"])
    ap.add_argument("--ddp-workload", action="store_true", help="the DDP workload table, N=2 and 4")
    ap.add_argument("--first", action="store_true", help="the first launch of a session: right after import, 3 s after")
    ap.add_argument("--repeat", type=int, default=5, help="warm calls after the first")
    ap.add_argument("--only", nargs="*", help="launchers to run (default: all)")
    ap.add_argument("--png", help="write a bar chart here (needs matplotlib)")
    a = ap.parse_args()
    if a.ddp_workload:
        ddp_workload(a.repeat, a.png)
        return
    if a.first:
        first_launch(a.nprocs, a.fn, a.repeat)
        return
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


def ddp_workload(repeat: int, png: str | None) -> None:
    rows = []  # (N, label, times)
    for n in (2, 4):
        rows.append((n, "mpify, gloo init + all_reduce (trivial)", measure("mpify ranch", n, "gloo_allreduce", repeat)))
        for name in ("mpify ranch", "accelerate notebook_launcher", "torch.mp.spawn"):
            rows.append((n, f"{name}, DDP + 20 steps", measure(name, n, "ddp_train", repeat)))
    print(f"\nThe DDP workload, warm = median of {repeat} calls after the first, each launcher in a fresh "
          f"process; {machine()}")
    print(f"{'N':>2} {'launcher':46} {'first (s)':>10} {'warm (s)':>9} {'vs trivial':>11} {'vs mpify DDP':>13}")
    for n in (2, 4):
        mine = {label: t for m, label, t in rows if m == n and isinstance(t, list)}
        trivial = statistics.median(mine["mpify, gloo init + all_reduce (trivial)"][1:])
        ddp = statistics.median(mine["mpify ranch, DDP + 20 steps"][1:])
        for m, label, t in rows:
            if m != n:
                continue
            if isinstance(t, str):
                print(f"{n:>2} {label:46} {t}")
                continue
            warm = statistics.median(t[1:])
            print(f"{n:>2} {label:46} {t[0]:10.3f} {warm:9.3f} {warm / trivial:10.1f}x {warm / ddp:12.1f}x")
    if png:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        ok = [(f"N={n}: {label.split(',')[0]}" + (" (trivial)" if "trivial" in label else ""), t)
              for n, label, t in rows if isinstance(t, list)]
        fig, ax = plt.subplots(figsize=(9, 4.5))
        y = range(len(ok))
        ax.barh([i + 0.2 for i in y], [t[0] for _, t in ok], 0.4, label="first call")
        ax.barh([i - 0.2 for i in y], [statistics.median(t[1:]) for _, t in ok], 0.4, label="warm (median)")
        ax.set_yticks(list(y), [k for k, _ in ok])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel("seconds (log scale)")
        ax.set_title("DDP + 20 steps, torchrun-style function")
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        print(f"chart written to {png}")


if __name__ == "__main__":
    main()
