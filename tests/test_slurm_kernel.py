"""A notebook inside a Slurm allocation, as on Open OnDemand or after `salloc -N 2`: a real
Jupyter kernel (nbclient + ipykernel) runs in the batch step on n1, `%mpify start 2 --slurm --ddp`
makes a world of the kernel and three more ranks, one of them beside it and two on n2, and the
`%%ranch` cells keep each rank's state from one cell to the next."""
from __future__ import annotations

import json
import sys
import time

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from test_slurm_launch import job_processes

pytestmark = pytest.mark.timeout(400)

CELLS = [
    new_markdown_cell("# Data parallel across the allocation\nTwo ranks per node, this kernel is rank 0."),
    new_code_cell("%load_ext mpify"),
    new_code_cell("import torch"),
    new_code_cell("%mpify start 2 --slurm --ddp"),
    new_code_cell("%mpify status"),
    new_code_cell("%%ranch\nimport os\nimport torch\nimport torch.distributed as dist\nrank = dist.get_rank()\nw = torch.full((3,), float(rank + 1))\n"
                  "print('ready on', os.environ['SLURMD_NODENAME'], 'world', dist.get_world_size())"),
    new_markdown_cell("Every rank still holds `w`: average it across the nodes."),
    new_code_cell("%%ranch\ndist.all_reduce(w)\nw /= dist.get_world_size()\nw.sum().item()"),
    new_code_cell("%%ranch --ranks 3\nrank, os.environ['SLURMD_NODENAME']"),
    new_code_cell("%mpify stop"),
]


def test_a_notebook_world_across_two_nodes(cluster, tmp_path):
    spec = tmp_path / "jupyter" / "kernels" / "mpify-slurm"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "mpify slurm", "language": "python"}))
    nbformat.write(new_notebook(cells=CELLS), str(tmp_path / "nb.ipynb"))
    (tmp_path / "drive.py").write_text(
        "import nbformat, sys\nfrom nbclient import NotebookClient\n"
        "nb = nbformat.read('nb.ipynb', as_version=4)\n"
        "NotebookClient(nb, kernel_name='mpify-slurm', timeout=240, allow_errors=True,\n"
        "               resources={'metadata': {'path': '.'}}).execute()\n"
        "nbformat.write(nb, 'out.ipynb')\nprint('DONE', flush=True)\n")
    (tmp_path / "job.sh").write_text(f"#!/bin/sh\nexport JUPYTER_PATH={tmp_path / 'jupyter'}\n"
                                     f"exec {sys.executable} -u drive.py\n")
    out = tmp_path / "job.out"
    done = cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp_path), str(tmp_path / "job.sh")],
                       timeout=360, check=False)
    log = out.read_text() if out.exists() else "(no output file)"
    assert done.returncode == 0 and "DONE" in log, f"{done.stdout}{done.stderr}\n{log}"
    nb = nbformat.read(str(tmp_path / "out.ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]

    def text(cell) -> str:
        parts = []
        for o in cell.outputs:
            if o.output_type == "error":
                parts.append(f"ERROR {o.ename}: {o.evalue}")
            elif o.output_type == "stream":
                parts.append(o.text)
            elif "text/plain" in o.get("data", {}):
                parts.append(o.data["text/plain"])
        return "".join(parts)

    outputs = [text(c) for c in code]
    assert not any("ERROR" in t for t in outputs), "\n---\n".join(outputs)
    start, status, ready, reduced, one, stop = outputs[2:]
    assert "a world of 4 ranks is up on 2 nodes" in start, start
    # %mpify status: each rank's node
    rows = [line.split() for line in status.splitlines()[1:]]
    assert [(r[0], r[1], r[3]) for r in rows] == [("0", "n1", "True"), ("1", "n1", "True"),
                                                  ("2", "n2", "True"), ("3", "n2", "True")], status
    for rank, node in ((1, "n1"), (2, "n2"), (3, "n2")):
        assert f"[rank {rank}] ready on {node} world 4" in ready, ready
    assert "ready on n1 world 4" in ready.splitlines()[0] or "ready on n1 world 4" in ready, ready
    # the mean of 1, 2, 3, 4 in each of 3 places, on every rank: rank 0's value, the others' lines
    assert "7.5" in reduced and all(f"[rank {r}] 7.5" in reduced for r in (1, 2, 3)), reduced
    assert "(3, 'n2')" in one and "[rank" not in one.replace("[rank 3]", ""), one
    assert "closed" in stop, stop
    time.sleep(1)
    left = job_processes(cluster)
    assert not left, [(p.pid, p.name()) for p in left]
