"""Run All of the sample notebooks in a real kernel, as a new user does first: no error, and what
the child ranks printed or drew is in the saved notebook (ddp_train and live_world have tests of
their own: test_torch_ddp.py, test_world_kernel.py)."""
from __future__ import annotations

import base64
import os
import shutil

import nbformat
import pytest

from helpers import described, strays

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "sample_notebooks")


def run_all(shared_kernel, tmp_path, name: str):
    for f in os.listdir(ROOT):  # the notebook with its helper module beside it, as a user has it
        shutil.copy(os.path.join(ROOT, f), tmp_path)
    nb = nbformat.read(os.path.join(ROOT, name), as_version=4)
    shared_kernel.run(nb, tmp_path, timeout=120)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, [(e.ename, e.evalue) for e in errors]
    assert not strays(), described(strays())
    return code


def stream(cells) -> str:
    return "".join(o.get("text", "") for c in cells for o in c.outputs if o.output_type == "stream")


@pytest.mark.parametrize("name, says", [("hello_ranks.ipynb", "[rank 1] hello from rank 1 of 2"),
                                        ("dataloader_workers.ipynb", "[rank 1] rank 1: sum 85344.0 from 2 workers")])
def test_sample_notebook_runs_all_with_every_ranks_lines(shared_kernel, tmp_path, name, says):
    assert says in stream(run_all(shared_kernel, tmp_path, name))


def test_lesson_notebook_runs_all_with_every_ranks_picture(shared_kernel, tmp_path):
    code = run_all(shared_kernel, tmp_path, "lesson_mlp.ipynb")
    last = code[-1]
    pictures = {o.metadata.get("mpify", {}).get("rank", 0): o for o in last.outputs
                if o.output_type == "display_data" and "image/png" in o.data}
    assert set(pictures) == {0, 1}, [(o.output_type, sorted(o.get("data", {}))) for o in last.outputs]
    for rank, o in pictures.items():
        assert base64.b64decode(o.data["image/png"])[:4] == b"\x89PNG"
    assert pictures[1].data["text/plain"].startswith("[rank 1] <Figure")
    assert "[rank 1] <Figure size 300x300 with 1 Axes>" in stream([last])  # its label, above it
    # the lesson's DDP training cell still trains
    assert "'world_size': 2" in "".join(o.get("data", {}).get("text/plain", "") for c in code for o in c.outputs)
