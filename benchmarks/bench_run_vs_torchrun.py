"""Wall time of `mpify run` on the DDP sample next to torchrun on the script `mpify export` writes.

Both are what a user types in a shell, timed from process start to exit (subprocess, wall clock),
the same training (sample_notebooks/ddp_train.ipynb, `train`, 2 ranks, gloo on CPU):

    mpify run sample_notebooks/ddp_train.ipynb --fn train -n 2 --ddp
    torchrun --nproc-per-node 2 exported.py

`mpify run` slices the notebook and imports the slice each time (that cost is included); the
export is written once, before timing. Prints the median and min of --repeat runs of each, with
the machine's cores and CPU model.

    python benchmarks/bench_run_vs_torchrun.py [--repeat 5] [-n 2] [-- train options, e.g. --epochs 3]
"""
from __future__ import annotations

import argparse
import os
from _machine import machine
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
NB = os.path.join("sample_notebooks", "ddp_train.ipynb")


def timed(cmd: list[str]) -> float | None:
    """Seconds, or None when the command failed (its stderr's tail is printed; the run is counted
    as a failure, not timed)."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    dt = time.perf_counter() - t0
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.splitlines() if ln.strip()][-3:]
        print(f"FAILED ({r.returncode}): {' '.join(cmd[:3])} ...: " + " | ".join(tail), file=sys.stderr)
        return None
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("-n", type=int, default=2, help="ranks")
    ap.add_argument("train_args", nargs="*", help="after --: options for train (e.g. --epochs 3)")
    opts = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, "train_ddp.py")
        subprocess.run([os.path.join(BIN, "mpify"), "export", NB, "--fn", "train", "--ddp", "-o", script],
                       cwd=ROOT, check=True, stderr=subprocess.DEVNULL)
        cmds = {
            f"mpify run {NB} --fn train -n {opts.n} --ddp":
                [os.path.join(BIN, "mpify"), "run", NB, "--fn", "train", "-n", str(opts.n), "--ddp",
                 "--", *opts.train_args],
            f"torchrun --nproc-per-node {opts.n} train_ddp.py (exported)":
                [os.path.join(BIN, "torchrun"), "--nproc-per-node", str(opts.n), script, *opts.train_args],
        }
        for cmd in cmds.values():  # warm the page cache (torch import) once, not timed
            timed(cmd)
        times = {name: [] for name in cmds}
        for _ in range(opts.repeat):  # interleaved, so drift on a shared machine hits both alike
            for name, cmd in cmds.items():
                times[name].append(timed(cmd))
    print(f"machine: {machine()}")
    print(f"wall time of the whole command, {opts.repeat} runs each"
          + (f", train options: {' '.join(opts.train_args)}" if opts.train_args else ""))
    width = max(map(len, times))
    print(f"{'command':<{width}}  {'median s':>9}  {'min s':>7}  {'vs first':>8}  failed")
    base = None
    for name, all_ts in times.items():
        ts = [t for t in all_ts if t is not None]
        if not ts:
            print(f"{name:<{width}}  {'-':>9}  {'-':>7}  {'-':>8}  {len(all_ts)}")
            continue
        med = statistics.median(ts)
        base = base or med
        print(f"{name:<{width}}  {med:>9.2f}  {min(ts):>7.2f}  {'x%.2f' % (med / base):>8}  "
              f"{len(all_ts) - len(ts)}")


if __name__ == "__main__":
    main()
