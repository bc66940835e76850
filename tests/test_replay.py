"""A replay is a replay: the slice is the notebook's state where the notebook ran the target.

Two notebooks written the way public tutorials are:

- an introduction-to-PyTorch tutorial: `train_model(model, optimizer, train_data_loader,
  loss_module)` in one cell, then a TensorBoard section that imports `SummaryWriter`, builds a
  new model and optimizer and trains them with a logger. The replay mpify suggests carries
  `--cell` of that call, so the later section (its import fails where tensorboard is not
  installed) is not part of it, and it trains to the same loss as the notebook's own cells do;
- an accelerate-style notebook whose `train` is launched in its own cell
  (`notebook_launcher(train, num_processes=2)`, or `ranch`, `mp.spawn`, a plain call), after
  which a later cell reloads the tokenizer from the training's own output folder: the slice takes
  the tokenizer from before the launch, and the exported script runs in a fresh directory.

Every slice is run in a subprocess (`mpify run`, or the script `mpify export` writes from the same
options, under python).
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from export_helpers import mpify

# ---- an introduction-to-PyTorch tutorial, with a TensorBoard section after the training ---------

INTRO = [
    new_markdown_cell("# Introduction to PyTorch\n\nA small classifier on the continuous XOR problem."),
    new_code_cell("import torch\nimport torch.nn as nn\nimport torch.utils.data as data\n\ntorch.manual_seed(42)"),
    new_code_cell("class SimpleClassifier(nn.Module):\n\n    def __init__(self, num_inputs, num_hidden, num_outputs):\n"
                  "        super().__init__()\n        self.linear1 = nn.Linear(num_inputs, num_hidden)\n"
                  "        self.act_fn = nn.Tanh()\n        self.linear2 = nn.Linear(num_hidden, num_outputs)\n\n"
                  "    def forward(self, x):\n        return self.linear2(self.act_fn(self.linear1(x)))"),
    new_code_cell("class XORDataset(data.Dataset):\n\n    def __init__(self, size, std=0.1):\n"
                  "        super().__init__()\n        self.size = size\n        self.std = std\n"
                  "        data = torch.randint(low=0, high=2, size=(size, 2), dtype=torch.float32)\n"
                  "        label = (data.sum(dim=1) == 1).to(torch.long)\n"
                  "        self.data = data + self.std * torch.randn(data.shape)\n        self.label = label\n\n"
                  "    def __len__(self):\n        return self.size\n\n"
                  "    def __getitem__(self, idx):\n        return self.data[idx], self.label[idx]"),
    new_code_cell("model = SimpleClassifier(num_inputs=2, num_hidden=4, num_outputs=1)\nprint(model)"),
    new_code_cell("loss_module = nn.BCEWithLogitsLoss()\noptimizer = torch.optim.SGD(model.parameters(), lr=0.1)"),
    new_code_cell("train_dataset = XORDataset(size=200)\n"
                  "train_data_loader = data.DataLoader(train_dataset, batch_size=32, shuffle=True)"),
    new_code_cell("def train_model(model, optimizer, data_loader, loss_module, num_epochs=20):\n"
                  "    model.train()\n    for epoch in range(num_epochs):\n"
                  "        for data_inputs, data_labels in data_loader:\n"
                  "            preds = model(data_inputs).squeeze(dim=1)\n"
                  "            loss = loss_module(preds, data_labels.float())\n"
                  "            optimizer.zero_grad()\n            loss.backward()\n            optimizer.step()\n"
                  "    return round(loss.item(), 6)"),
    new_code_cell("train_model(model, optimizer, train_data_loader, loss_module)"),  # cell 9
    new_markdown_cell("## Logging with TensorBoard"),
    new_code_cell("from torch.utils.tensorboard import SummaryWriter\n%load_ext tensorboard"),
    new_code_cell("def train_model_with_logger(model, optimizer, data_loader, loss_module, val_dataset,\n"
                  "                            num_epochs=20, logging_dir='runs/our_experiment'):\n"
                  "    writer = SummaryWriter(logging_dir)\n    model.train()\n"
                  "    for epoch in range(num_epochs):\n"
                  "        for data_inputs, data_labels in data_loader:\n"
                  "            preds = model(data_inputs).squeeze(dim=1)\n"
                  "            loss = loss_module(preds, data_labels.float())\n"
                  "            optimizer.zero_grad()\n            loss.backward()\n            optimizer.step()\n"
                  "        writer.add_scalar('training_loss', loss.item(), global_step=epoch + 1)\n"
                  "    writer.close()"),
    new_code_cell("model = SimpleClassifier(num_inputs=2, num_hidden=4, num_outputs=1)\n"
                  "optimizer = torch.optim.SGD(model.parameters(), lr=0.1)\n"
                  "train_model_with_logger(model, optimizer, train_data_loader, loss_module,\n"
                  "                        val_dataset=train_dataset)"),
]
CALL_CELL = 9
REPLAY = "train_model(model, optimizer, train_data_loader, loss_module)"


def _intro(tmp_path):
    path = tmp_path / "intro_to_pytorch.ipynb"
    nbformat.write(new_notebook(cells=INTRO), str(path))
    return path


def _notebook_value() -> float:
    """What the notebook's cell 9 shows: cells 1-9 run in order (no IPython syntax there), in this
    process (torch is imported here already), the call's value returned."""
    code = "\n\n".join(c.source for c in INTRO[:CALL_CELL - 1] if c.cell_type == "code")
    ns: dict = {"__name__": "intro_to_pytorch"}
    exec(compile(code, "intro_to_pytorch", "exec"), ns)
    return eval(REPLAY, ns)


def test_the_suggested_replay_carries_the_cell_of_the_call_and_runs_as_the_notebook_did(tmp_path, tmpdir_):
    nb = _intro(tmp_path)
    r = mpify("run", nb, "--fn", "train_model", tmpdir=tmpdir_)
    assert r.returncode == 2
    assert r.stderr.splitlines()[1] == f"mpify: to replay that call, use --call '{REPLAY}' --cell {CALL_CELL}"
    options = shlex.split(r.stderr.splitlines()[1].split(", use ", 1)[1])

    # The same options export the script `mpify run` would import (one renderer): run it as a
    # user would, in a fresh interpreter (one torch import, not the launcher's as well).
    script = tmp_path / "replay.py"
    e = mpify("export", nb, *options, "-o", script, tmpdir=tmpdir_)
    assert e.returncode == 0, e.stderr
    assert "tensorboard" not in script.read_text() and "# ---- cell 11" not in script.read_text()
    ok = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert float(ok.stdout.strip().splitlines()[-1]) == _notebook_value()

    # Without its --cell the replay is the same: the call is the notebook's own (cell 9), so the
    # slice is taken there, not at the end (issue 25), and leaves out the TensorBoard section (the
    # later `model` and `optimizer`, the logger's training, and its import, which fails where
    # tensorboard is not installed, as here).
    bare = mpify("deps", nb, "--call", REPLAY, tmpdir=tmpdir_)
    assert bare.returncode == 0, bare.stderr
    assert bare.stdout.splitlines()[0].endswith(f"as of cell {CALL_CELL}, line 1, where the notebook runs it: {REPLAY}")
    assert "tensorboard" not in bare.stdout and "cell 13" not in bare.stdout
    # As of the notebook's end, asked for with --cell: the TensorBoard section is in.
    late = mpify("deps", nb, "--call", REPLAY, "--cell", str(len(INTRO)), tmpdir=tmpdir_)
    assert late.returncode == 0, late.stderr
    assert "cell 11, line 1: from torch.utils.tensorboard import SummaryWriter" in late.stdout
    assert "cell 13, line 1: model = SimpleClassifier(num_inputs=2, num_hidden=4, num_outputs=1)" in late.stdout


def test_deps_takes_the_call_and_the_cell(tmp_path, tmpdir_):
    nb = _intro(tmp_path)
    r = mpify("deps", nb, "--call", REPLAY, "--cell", str(CALL_CELL), "--json", tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["target"] == "train_model" and report["upto_cell"] == CALL_CELL
    assert report["cells_used"] == [2, 3, 4, 5, 6, 7, 8]
    kept = {(i["cell"], i["source"].strip().splitlines()[0]) for i in report["items"]}
    assert (5, "model = SimpleClassifier(num_inputs=2, num_hidden=4, num_outputs=1)") in kept
    assert any("the --call expression" in reason for i in report["items"] for reason in i["reasons"])
    bad = mpify("deps", nb, "--call", "train_model(modle, optimizer, train_data_loader, loss_module)",
                "--cell", str(CALL_CELL), tmpdir=tmpdir_)
    assert bad.returncode == 2 and bad.stderr.startswith("mpify: error: --call ") and "`modle`" in bad.stderr


# ---- a launch in the def's own cell, then the tokenizer reloaded from the training's output -----

TOKENIZER = '''\
import json, os


class CharTokenizer:
    """A character tokenizer with the save/load pair of a real one."""

    def __init__(self, alphabet):
        self.alphabet = alphabet

    def encode(self, text):
        return [self.alphabet.index(c) + 1 for c in text]

    def save_pretrained(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "tokenizer.json"), "w") as f:
            json.dump({"alphabet": self.alphabet}, f)

    @classmethod
    def from_pretrained(cls, folder):
        with open(os.path.join(folder, "tokenizer.json")) as f:
            return cls(json.load(f)["alphabet"])
'''

LAUNCH_LINES = {
    "notebook_launcher": "notebook_launcher(train, num_processes=2)",
    "ranch": "ranch(2, train)",
    "mp.spawn": "mp.spawn(train, nprocs=2)",
    "call": "train()",
}


def _launch_notebook(tmp_path, form):
    (tmp_path / "char_tokenizer.py").write_text(TOKENIZER)
    cells = [
        new_markdown_cell("# Fine-tuning on 2 processes"),
        new_code_cell("from accelerate import notebook_launcher\nfrom mpify import ranch\n"
                      "import torch.multiprocessing as mp\nfrom char_tokenizer import CharTokenizer"),
        new_code_cell("OUTPUT_DIR = 'char-model'\ntokenizer = CharTokenizer(' abcdefgh')"),
        new_code_cell("def train(rank=0):\n    ids = tokenizer.encode('a bad cab')\n"
                      "    tokenizer.save_pretrained(OUTPUT_DIR)\n    return sum(ids)\n\n" + LAUNCH_LINES[form]),
        new_markdown_cell("Load what the training saved."),
        new_code_cell("tokenizer = CharTokenizer.from_pretrained(OUTPUT_DIR)\ntokenizer.encode('cab')"),
    ]
    path = tmp_path / "launch.ipynb"
    nbformat.write(new_notebook(cells=cells), str(path))
    return path


@pytest.mark.parametrize("form", list(LAUNCH_LINES))
def test_a_run_in_the_defs_own_cell_bounds_the_slice(tmp_path, tmpdir_, form):
    nb = _launch_notebook(tmp_path, form)
    d = mpify("deps", nb, "--fn", "train", tmpdir=tmpdir_)
    assert d.returncode == 0, d.stderr
    assert d.stdout.splitlines()[0] == (f"train (function) in {nb}, as of cell 4, line 6, where the notebook "
                                        f"runs it: {LAUNCH_LINES[form]}")
    assert "cell 6" not in d.stdout and "cell 3, line 2: tokenizer = CharTokenizer(' abcdefgh')" in d.stdout

    script = tmp_path / "train.py"
    e = mpify("export", nb, "--fn", "train", "-o", script, tmpdir=tmpdir_)
    assert e.returncode == 0, e.stderr
    fresh = tmp_path / "fresh"  # a fresh run: no `char-model` folder from an earlier training
    fresh.mkdir()
    (fresh / "char_tokenizer.py").write_text(TOKENIZER)
    r = subprocess.run([sys.executable, str(script)], cwd=fresh, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "23"  # 'a bad cab': 2+1+3+2+5+1+4+2+3
    assert (fresh / "char-model" / "tokenizer.json").exists()


def test_the_end_of_the_notebook_with_cell_and_the_run_with_mpify_run(tmp_path, tmpdir_):
    nb = _launch_notebook(tmp_path, "notebook_launcher")
    # --cell K is the end of cell K, as before: cell 6's binding is the one `train` reads there.
    d = mpify("deps", nb, "--fn", "train", "--cell", "6", tmpdir=tmpdir_)
    assert d.returncode == 0 and "cell 6, line 1: tokenizer = CharTokenizer.from_pretrained(OUTPUT_DIR)" in d.stdout
    r = mpify("run", nb, "--fn", "train", "-n", "2", "--json", tmpdir=tmpdir_)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1]) == 23
