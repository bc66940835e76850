"""A `--call` replays the notebook's own call: the slice is the notebook's state there (issue 25).

Sliced as of the notebook's end, as it was, a replay of `train(model, 2)` kept what later cells did:
a from-scratch experiment after the call, a new `model` for inference, and trained that one. On a
lesson written that way, `mpify run --call` must give what the notebook's own cell gave in a real
kernel; a call of something only later cells make is still taken as of the end.
"""
from __future__ import annotations

import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from export_helpers import mpify

pytest.importorskip("torch")

LESSON = [
    new_markdown_cell("# Lesson 4: a training loop\nWe fit a linear model to synthetic data."),
    new_code_cell("import torch\nimport torch.nn as nn\nfrom torch.utils.data import DataLoader, TensorDataset"),
    new_code_cell("torch.manual_seed(0)\nX = torch.randn(128, 4)\ny = X @ torch.tensor([[1.0], [-1.0], [0.5], [2.0]])\n"
                  "loader = DataLoader(TensorDataset(X, y), batch_size=16)"),
    new_markdown_cell("Build the model."),
    new_code_cell("torch.manual_seed(1)\nmodel = nn.Linear(4, 1)\nmodel"),
    new_code_cell("def train(model, epochs, lr=0.05):\n"
                  "    opt = torch.optim.SGD(model.parameters(), lr=lr)\n"
                  "    for _ in range(epochs):\n"
                  "        for xb, yb in loader:\n"
                  "            loss = nn.functional.mse_loss(model(xb), yb)\n"
                  "            opt.zero_grad()\n"
                  "            loss.backward()\n"
                  "            opt.step()\n"
                  "    return round(loss.item(), 6)"),
    new_code_cell("final = train(model, 2)\nfinal"),                              # cell 7
    new_markdown_cell("## Again from scratch, with a bigger learning rate"),
    new_code_cell("scratch = nn.Linear(4, 1)\ntrain(scratch, 1, lr=0.5)"),         # cell 9
    new_markdown_cell("## Inference with a wider model"),
    new_code_cell("torch.manual_seed(2)\nmodel = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))\n"
                  "big = nn.Linear(4, 1)\npreds = [model(xb) for xb, _ in loader]\nlen(preds)"),  # cell 11
]
CALL = "train(model, 2)"


def _write(tmp_path):
    path = tmp_path / "lesson4.ipynb"
    nbformat.write(new_notebook(cells=LESSON), path)
    return path


def _kernel_value(shared_kernel, tmp_path) -> float:
    """What cell 7 gives in a real kernel: cells 1-7 as the notebook has them, then `final`."""
    nb = new_notebook(cells=LESSON[:7] + [new_code_cell("import json\nprint('RESULT', json.dumps(final))")])
    shared_kernel.run(nb, tmp_path)
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    assert "RESULT" in text, nb.cells[-1].outputs
    return json.loads(text.split("RESULT", 1)[1])


def test_a_call_is_replayed_where_the_notebook_makes_it(tmp_path, tmpdir_, shared_kernel):
    path = _write(tmp_path)
    deps = mpify("deps", path, "--call", CALL, "--json", tmpdir=tmpdir_)
    assert deps.returncode == 0, deps.stderr
    report = json.loads(deps.stdout)
    assert (report["run_at"]["cell"], report["run_at"]["lineno"]) == (7, 1)
    kept = {(item["cell"], item["source"].strip()) for item in report["items"]}
    assert {cell for cell, _ in kept} == {2, 3, 5, 6}
    assert not any("scratch" in src or "Sequential" in src or "preds" in src for _, src in kept)

    run = mpify("run", path, "--call", CALL, "--json", tmpdir=tmpdir_)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout) == _kernel_value(shared_kernel, tmp_path)


def test_a_call_of_what_later_cells_make_is_taken_at_the_end(tmp_path, tmpdir_):
    path = _write(tmp_path)
    deps = mpify("deps", path, "--call", "train(big, 1)", "--json", tmpdir=tmpdir_)
    assert deps.returncode == 0, deps.stderr
    report = json.loads(deps.stdout)
    assert report["run_at"] is None
    assert any("big = nn.Linear(4, 1)" in item["source"] for item in report["items"] if item["cell"] == 11)


def test_another_call_replays_the_notebook_s_last_run(tmp_path, tmpdir_):
    # `train(model, 5)` is no call of the notebook's: its last run (cell 9) is the point, where
    # `model` is still the linear one, trained by cell 7 (which runs the target: left out, warned).
    path = _write(tmp_path)
    deps = mpify("deps", path, "--call", "train(model, 5)", "--json", tmpdir=tmpdir_)
    assert deps.returncode == 0, deps.stderr
    report = json.loads(deps.stdout)
    assert (report["run_at"]["cell"], report["run_at"]["lineno"]) == (9, 2)
    assert not any(item["cell"] >= 9 for item in report["items"])
