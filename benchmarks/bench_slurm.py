"""A launch across two Slurm nodes against one node, and against `srun torchrun` of the exported
script: median seconds of several launches, printed as a table.

Run (root, Debian: it installs and starts a real two-node Slurm on this machine, each node in a
network namespace of its own, as the tests do): python benchmarks/bench_slurm.py [--runs 5]

Everything is measured inside one batch job on the first node, as a notebook inside an allocation
would run it, with a trivial function (a DDP all_reduce for the DDP rows), after one launch that
warms the caller (its forkserver, torch's import):
- `ranch(2, f)`: this node only (2 ranks);
- `ranch(2, f, launcher="slurm")`: 2 nodes x 2 ranks, the other node's ranks through an srun step;
- the same with `torchddp_launch` (gloo all_reduce across the nodes);
- `srun torchrun` of `mpify export --ddp --slurm`'s script on both nodes (its sbatch line), each
  run a fresh torchrun per node, as that script runs.
Issue 26's goal: a warm 2-node launch <= 1.5x a 1-node launch.
"""
from __future__ import annotations

import argparse
import ast
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from slurm_cluster import SlurmCluster, ensure_available  # noqa: E402

JOB = r'''
import os, statistics, subprocess, sys, time
from mpify import ranch, torchddp_launch

def trivial():
    return int(os.environ["RANK"])

def reduce():
    import torch, torch.distributed as dist
    t = torch.ones(1)
    dist.all_reduce(t)
    return t.item()

def timed(call, runs):
    call()  # warm
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)

runs = int(sys.argv[1])
script, python = sys.argv[2], sys.executable
head = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                      capture_output=True, text=True).stdout.split()[0]
port = 20000 + int(os.environ["SLURM_JOB_ID"]) % 20000
torchrun = ["srun", "--overlap", "--ntasks-per-node=1", "-N2", python, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint",
            f"{head}:{port}", "--rdzv-id", os.environ["SLURM_JOB_ID"], script]
rows = {
    "ranch, 1 node x 2 ranks": timed(lambda: ranch(2, trivial), runs),
    "ranch, 2 nodes x 2 ranks (launcher='slurm')": timed(lambda: ranch(2, trivial, launcher="slurm"), runs),
    "torchddp_launch all_reduce, 1 node x 2 ranks": timed(lambda: torchddp_launch(2, reduce), runs),
    "torchddp_launch all_reduce, 2 nodes x 2 ranks": timed(lambda: torchddp_launch(2, reduce, launcher="slurm"), runs),
    "srun torchrun of the exported script, 2 nodes x 2 ranks":
        timed(lambda: subprocess.run(torchrun, check=True, capture_output=True), runs),
}
print("ROWS", repr(rows), flush=True)
'''

NOTEBOOK_CELLS = ["import torch\nimport torch.distributed as dist",
                  "def reduce():\n    t = torch.ones(1)\n    dist.all_reduce(t)\n    return t.item()"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    opts = ap.parse_args()
    ok, why = ensure_available()
    if not ok:
        sys.exit(f"no Slurm cluster here: {why}")
    import subprocess

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    with tempfile.TemporaryDirectory(prefix="bench-slurm-") as tmp, SlurmCluster(nodes=2) as cluster:
        tmp = Path(tmp)
        nbformat.write(new_notebook(cells=[new_code_cell(c) for c in NOTEBOOK_CELLS]), str(tmp / "nb.ipynb"))
        mpify = os.path.join(os.path.dirname(sys.executable), "mpify")
        subprocess.run([mpify, "export", str(tmp / "nb.ipynb"), "--fn", "reduce", "--ddp", "-o",
                        str(tmp / "reduce.py")], check=True, capture_output=True)
        (tmp / "bench.py").write_text(JOB)
        (tmp / "job.sh").write_text(f"#!/bin/sh\n{sys.executable} -u {tmp / 'bench.py'} {opts.runs} "
                                    f"{tmp / 'reduce.py'}\n")
        out = tmp / "job.out"
        cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp), str(tmp / "job.sh")],
                    timeout=1200, check=False)
        log = out.read_text() if out.exists() else ""
        line = next((ln for ln in log.splitlines() if ln.startswith("ROWS ")), None)
        if line is None:
            sys.exit(f"the job printed no table:\n{log}")
        rows = ast.literal_eval(line[5:])
    print(f"median of {opts.runs} warm launches, inside one batch job on the first node "
          f"({'own network namespaces' if cluster.netns else 'loopback'})")
    width = max(map(len, rows))
    one = rows["ranch, 1 node x 2 ranks"]
    print(f"{'launch':<{width}}  {'seconds':>8}  {'x 1 node':>8}")
    for name, seconds in rows.items():
        print(f"{name:<{width}}  {seconds:8.3f}  {seconds / one:8.1f}")
    ratio = rows["ranch, 2 nodes x 2 ranks (launcher='slurm')"] / one
    print(f"goal: a warm 2-node launch <= 1.5x a 1-node launch: {ratio:.1f}x, "
          f"{'met' if ratio <= 1.5 else 'not met'}")


if __name__ == "__main__":
    main()
