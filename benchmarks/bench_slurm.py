"""A launch across two Slurm nodes against one node, and against `srun torchrun` of the exported
script: median seconds of several launches, printed as a table.

Run (root, Debian: it installs and starts a real two-node Slurm on this machine, each node in a
network namespace of its own, as the tests do): python benchmarks/bench_slurm.py [--runs 5]

Everything is measured inside one batch job on the first node, as a notebook inside an allocation
would run it, with a trivial function (a DDP all_reduce for the DDP rows), after one launch that
warms the caller (its forkserver, torch's import) and the other node's resident process:
- `ranch(2, f)`: this node only (2 ranks); `ranch(4, f)`: 4 ranks on this node, as many
  processes as the 2-node launch starts (both "nodes" share this machine's cores);
- `ranch(2, f, launcher="slurm")`: 2 nodes x 2 ranks, the other node's ranks forked by its
  resident process (kept warm between launches);
- the same with `torchddp_launch` (gloo all_reduce across the nodes);
- `srun torchrun` of `mpify export --ddp --slurm`'s script on both nodes (its sbatch line), each
  run a fresh torchrun per node, as that script runs.
Then, in a second job, a real Jupyter kernel (benchmarks/_kernel.py, timed from the execute
request to the kernel's idle status, as a user waits for a cell):
- `%mpify start 2 --slurm` (2 nodes x 2 ranks): the first start (the other node's process
  started through srun), then warm starts after `%mpify stop`; `%mpify start 2` on one node;
- a trivial `%%ranch\npass` cell in the 2-node world against a plain `pass`, interleaved; the
  overhead is the difference of the medians.
Issue 26's goals: a warm 2-node launch <= 1.5x a 1-node launch; a cell <= 20 ms over a plain cell.
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
# The other node's resident process starts, imports torch as this process has, and its forkserver
# preloads it in the background: what a notebook's first minute does. Measured once that is done.
ranch(2, trivial, launcher="slurm")
torchddp_launch(2, reduce, launcher="slurm")
time.sleep(20)
rows = {
    "ranch, 1 node x 2 ranks": timed(lambda: ranch(2, trivial), runs),
    "ranch, 1 node x 4 ranks": timed(lambda: ranch(4, trivial), runs),
    "ranch, 2 nodes x 2 ranks (launcher='slurm')": timed(lambda: ranch(2, trivial, launcher="slurm"), runs),
    "torchddp_launch all_reduce, 1 node x 2 ranks": timed(lambda: torchddp_launch(2, reduce), runs),
    "torchddp_launch all_reduce, 2 nodes x 2 ranks": timed(lambda: torchddp_launch(2, reduce, launcher="slurm"), runs),
    "srun torchrun of the exported script, 2 nodes x 2 ranks":
        timed(lambda: subprocess.run(torchrun, check=True, capture_output=True), runs),
}
print("ROWS", repr(rows), flush=True)
'''

KERNEL_JOB = r'''
import statistics, sys
sys.path.insert(0, sys.argv[2])
from _kernel import Kernel

cells = int(sys.argv[1])
k = Kernel()
try:
    def run(code):
        cell = k.run(code)
        assert cell.ok, (code, cell.why(), cell.stdout, cell.stderr)
        return cell.took
    run("%load_ext mpify\nimport torch")
    rows = {}
    rows["%mpify start 2 (1 node x 2 ranks), warm"] = statistics.median(
        [run("%mpify start 2") + 0 * run("%mpify stop") for _ in range(3)])
    rows["%mpify start 2 --slurm (2 nodes x 2 ranks), first"] = run("%mpify start 2 --slurm")
    run("%mpify stop")
    rows["%mpify start 2 --slurm (2 nodes x 2 ranks), warm"] = statistics.median(
        [run("%mpify start 2 --slurm") + 0 * run("%mpify stop") for _ in range(3)])
    run("%mpify start 2 --slurm")
    run("%%ranch\npass")
    plain, ranch = [], []
    for _ in range(cells):
        plain.append(run("pass"))
        ranch.append(run("%%ranch\npass"))
    rows["plain cell"] = statistics.median(plain)
    rows["%%ranch cell, 2 nodes x 2 ranks"] = statistics.median(ranch)
    run("%mpify stop")
    print("ROWS", repr(rows), flush=True)
finally:
    k.shutdown()
'''

NOTEBOOK_CELLS = ["import torch\nimport torch.distributed as dist",
                  "def reduce():\n    t = torch.ones(1)\n    dist.all_reduce(t)\n    return t.item()"]


def _job_rows(cluster, tmp: Path, name: str, text: str, args: str) -> dict:
    """Run `text` as a 2-node batch job (`sbatch --wait`) with `args`; the table it printed."""
    (tmp / f"{name}.py").write_text(text)
    (tmp / f"{name}.sh").write_text(f"#!/bin/sh\n{sys.executable} -u {tmp / name}.py {args}\n")
    out = tmp / f"{name}.out"
    cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp), str(tmp / f"{name}.sh")],
                timeout=1200, check=False)
    log = out.read_text() if out.exists() else ""
    line = next((ln for ln in log.splitlines() if ln.startswith("ROWS ")), None)
    if line is None:
        sys.exit(f"the {name} job printed no table:\n{log}")
    return ast.literal_eval(line[5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cells", type=int, default=20)
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
        rows = _job_rows(cluster, tmp, "launches", JOB, f"{opts.runs} {tmp / 'reduce.py'}")
        krows = _job_rows(cluster, tmp, "kernel", KERNEL_JOB, f"{opts.cells} {ROOT / 'benchmarks'}")
    print(f"median of {opts.runs} warm launches, inside one batch job on the first node "
          f"({'own network namespaces' if cluster.netns else 'loopback'})")
    width = max(map(len, rows))
    one = rows["ranch, 1 node x 2 ranks"]
    print(f"{'launch':<{width}}  {'seconds':>8}  {'x 1 node':>8}")
    for name, seconds in rows.items():
        print(f"{name:<{width}}  {seconds:8.3f}  {seconds / one:8.1f}")
    two = rows["ranch, 2 nodes x 2 ranks (launcher='slurm')"]
    ratio, same = two / one, two / rows["ranch, 1 node x 4 ranks"]
    print(f"goal: a warm 2-node launch <= 1.5x a 1-node launch: {ratio:.1f}x against 2 ranks, "
          f"{same:.1f}x against as many processes on one node ({'met' if ratio <= 1.5 else 'not met'} against 2 ranks)")
    print()
    print(f"in a real Jupyter kernel inside the allocation (median; {opts.cells} cells of each kind)")
    kwidth = max(map(len, krows))
    print(f"{'cell':<{kwidth}}  {'seconds':>8}")
    for name, seconds in krows.items():
        print(f"{name:<{kwidth}}  {seconds:8.3f}")
    overhead = (krows["%%ranch cell, 2 nodes x 2 ranks"] - krows["plain cell"]) * 1000
    print(f"goal: a trivial %%ranch cell <= 20 ms over a plain cell: {overhead:.1f} ms, "
          f"{'met' if overhead <= 20 else 'not met'}")


if __name__ == "__main__":
    main()
