"""`mpify export --ddp --slurm`: the sbatch script written beside the exported one runs, as it is,
under `sbatch --wait -N 2` on a real two-node Slurm cluster (tests/slurm_cluster.py): torchrun on
each node, one rendezvous on the job's first node, global rank 0 printing the result."""
from __future__ import annotations

import ast
import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from export_helpers import SAMPLES, mpify

# A course-style notebook: imports, a helper, a peek, the function to run on the cluster.
CELLS = [
    new_markdown_cell("# Where do my ranks run?"),
    new_code_cell("import os, socket\nimport torch\nimport torch.distributed as dist"),
    new_code_cell("def where():\n    return (dist.get_rank(), os.environ.get('SLURMD_NODENAME'), socket.gethostname())"),
    new_code_cell("where  # a peek, as in a lesson"),
    new_code_cell("def census(scale: float = 1.0):\n"
                  "    t = torch.tensor([float(dist.get_rank() + 1) * scale])\n"
                  "    dist.all_reduce(t)\n"
                  "    seen = [None] * dist.get_world_size()\n"
                  "    dist.all_gather_object(seen, where())\n"
                  "    return {'world_size': dist.get_world_size(), 'sum': t.item(), 'ranks': seen}"),
]


def test_the_exported_sbatch_script_runs_on_two_nodes(cluster, tmp_path):
    nb = tmp_path / "census.ipynb"
    nbformat.write(new_notebook(cells=CELLS), str(nb))
    script = tmp_path / "census.py"
    r = mpify("export", nb, "--fn", "census", "--ddp", "--slurm", "-n", "2", "-o", script, tmpdir=tmp_path / "tmp")
    assert r.returncode == 0, r.stderr
    wrapper = tmp_path / "census.sbatch"
    assert f"wrote {wrapper}" in r.stderr
    assert os.access(wrapper, os.X_OK)
    out = tmp_path / "job.out"
    # submitted from another folder (the wrapper names the script by its absolute path), with an
    # option for the script after the wrapper's name
    done = cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", "/", str(wrapper), "--scale", "2"],
                       timeout=240, check=False)
    log = out.read_text() if out.exists() else "(no output file)"
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{log}"
    results = [ast.literal_eval(ln) for ln in log.splitlines() if ln.startswith("{")]
    assert len(results) == 1, log  # printed once, by global rank 0
    got = results[0]
    # 2 nodes x 2 ranks: (1 + 2 + 3 + 4) * 2
    assert got["world_size"] == 4 and got["sum"] == 20.0, got
    nodes = {rank: node for rank, node, _ in got["ranks"]}
    assert nodes == {0: "n1", 1: "n1", 2: "n2", 3: "n2"}, got["ranks"]
    if cluster.netns:  # each node a machine of its own: its own hostname
        assert {rank: host for rank, _, host in got["ranks"]} == nodes, got["ranks"]


def test_export_never_overwrites_the_sbatch_script_without_force(tmp_path):
    script = tmp_path / "rank_sum.py"
    (tmp_path / "rank_sum.sbatch").write_text("mine\n")
    r = mpify("export", SAMPLES / "hello_ranks.ipynb", "--fn", "rank_sum", "--ddp", "--slurm", "-o", script,
              tmpdir=tmp_path / "tmp")
    assert r.returncode == 2 and "rank_sum.sbatch exists; use --force" in r.stderr, r.stderr
    assert (tmp_path / "rank_sum.sbatch").read_text() == "mine\n" and not script.exists()
