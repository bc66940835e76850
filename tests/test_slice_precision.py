"""Slices that keep only what the target needs, and run outside a kernel (issue 25), on notebooks
written like course notebooks: an imports cell, exploration and display cells, a superseded
draft, the real function and its call.

Each test asserts the exact slice (cell and first line of every kept statement, and what is left
out), exports it with `mpify export` as a user does, runs the script in a fresh interpreter
(helpers.ForkedScripts: `python script.py`), and compares its printed result with what the
notebook's own cells give in a real Jupyter kernel (the session's shared kernel, conftest).
"""
from __future__ import annotations

import ast

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from export_helpers import mpify
from helpers import forked_scripts
from mpify.analysis import render_source, slice_notebook
from mpify.analysis.model import build_model
from mpify.analysis.notebook import load_notebook
from test_slice_course_notebooks import MARK, write_nb

torch = pytest.importorskip("torch")


def firsts(sl):
    """(cell, first line) of every kept statement, in order."""
    return [(it.cell, it.source.strip().splitlines()[0]) for it in sl.items]


def export_and_run(path, fn, tmp_path, *options):
    """`mpify export NB --fn FN` to a script beside the notebook, run as `python script.py` in the
    notebook's folder. Returns (the result it prints, the script's stdout, export's stderr)."""
    script = path.parent / f"{fn}_exported.py"
    r = mpify("export", str(path), "--fn", fn, "-o", str(script), *options, tmpdir=tmp_path / "tmproot")
    assert r.returncode == 0, r.stderr
    code, out, err = forked_scripts().run(script, path.parent)
    assert code == 0, f"{script.name} failed:\n{script.read_text()}\n{err}"
    return out.strip().splitlines()[-1], out, r.stderr


def notebook_results(shared_kernel, tmp, notebooks: dict, exprs: dict) -> dict:
    """The notebooks (name -> cells), each run whole in the session's shared kernel (`%reset -f`
    between them), followed by a cell that prints `exprs[name]`. {name: what it printed}."""
    nb = nbformat.v4.new_notebook()
    for name, cells in notebooks.items():
        nb.cells += [new_code_cell("%reset -f")]
        nb.cells += nbformat.read(str(write_nb(tmp, cells, f"{name}.ipynb")), as_version=4).cells
        nb.cells += [new_code_cell(f"print({MARK!r} + repr({exprs[name]}))")]
    shared_kernel.run(nb, tmp)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']}"
    printed = ["".join(o["text"] for o in c.outputs if o["output_type"] == "stream")
               for c in nb.cells if c.source.startswith(f"print({MARK!r}")]
    return {name: p.split(MARK)[-1].strip() for name, p in zip(notebooks, printed)}


@pytest.fixture(scope="module")
def kernel(shared_kernel, tmp_path_factory):
    """The notebooks of this module run in a real kernel, then the target's result: {name: it}."""
    return notebook_results(shared_kernel, tmp_path_factory.mktemp("kernel"), NOTEBOOKS, CALLS)


# ---- 1. state-less values are not changed through what was built from them -----------------------

STATELESS = [
    "md:# Lesson 3: a regression model on the GPU, if there is one",
    "import time\nimport torch\nfrom torch import nn\nimport torch.nn.functional as F",
    "device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')\ndevice",
    "md:How much faster is a matmul there? (A timing demo: nothing below needs it.)",
    "x = torch.randn(300, 300)\nx = x.to(device)\nstart = time.perf_counter()\nfor _ in range(3):\n"
    "    y = x @ x\nprint(f'{(time.perf_counter() - start) / 3 * 1000:.1f} ms per matmul on {device}')",
    "torch.manual_seed(0)\nn_feat = 4\nX = torch.randn(256, n_feat)\ntrue_w = torch.arange(1.0, n_feat + 1)\n"
    "y = X @ true_w + 0.1 * torch.randn(256)\nX_valid, y_valid = X[200:], y[200:]\nX.shape, y.shape",
    "md:What does a gradient look like? One by hand:",
    "w = torch.randn(n_feat, requires_grad=True)\nloss = ((X @ w - y) ** 2).mean()\nloss.backward()\nw.grad",
    "def sample_names(n):\n    \"Names for the rows of a demo table.\"\n    letters = 'abcdefgh'\n"
    "    pool = (letters[i % len(letters)] * 2 for i in range(n))\n    return [next(pool) for _ in range(n)]",
    "rows = sample_names(4)\nrows",
    "def valid_batches(bs=16):\n    for i in range(0, len(X_valid), bs):\n        yield X_valid[i:i + bs], y_valid[i:i + bs]",
    "def evaluate(model):\n    model.eval()\n    total, n = 0.0, 0\n    with torch.no_grad():\n"
    "        for xb, yb in valid_batches():\n            xb, yb = xb.to(device), yb.to(device)\n"
    "            total += F.mse_loss(model(xb).squeeze(1), yb, reduction='sum').item()\n"
    "            n += len(yb)\n    return total / n",
    "probe = nn.Linear(n_feat, 1).to(device)\nevaluate(probe)",
    "md:## Training\nA first draft, kept for the record:",
    "def train(epochs=3):\n    model = nn.Linear(n_feat, 1)\n    for _ in range(epochs):\n        pass\n    return model",
    "def train(epochs=3, lr=0.05, bs=32):\n    torch.manual_seed(1)\n    model = nn.Linear(n_feat, 1).to(device)\n"
    "    opt = torch.optim.SGD(model.parameters(), lr=lr)\n    for _ in range(epochs):\n"
    "        for i in range(0, len(X), bs):\n"
    "            xb, yb = X[i:i + bs].to(device), y[i:i + bs].to(device)\n"
    "            loss = F.mse_loss(model(xb).squeeze(1), yb)\n            opt.zero_grad()\n"
    "            loss.backward()\n            opt.step()\n    return round(evaluate(model), 4)",
    "train()",
]


def test_stateless_values_not_changed_through_what_was_built_from_them(tmp_path, kernel):
    path = write_nb(tmp_path, STATELESS)
    sl = slice_notebook(path, "train")
    # Before issue 25 the slice also kept the timing demo (cell 5: "changes `x`, which may share
    # `device`"), the backward by hand (cell 8: "writes the gradients of `n_feat`"), the demo
    # table (cell 10: "mutates `len`", "mutates `range`") and the probe (cell 13: "mutates
    # `n_feat`", and `evaluate(probe)`: "mutates `device`"): 9 statements a reader cuts.
    assert firsts(sl) == [
        (2, "import torch"), (2, "from torch import nn"), (2, "import torch.nn.functional as F"),
        (3, "device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')"),
        (6, "torch.manual_seed(0)"), (6, "n_feat = 4"), (6, "X = torch.randn(256, n_feat)"),
        (6, "true_w = torch.arange(1.0, n_feat + 1)"), (6, "y = X @ true_w + 0.1 * torch.randn(256)"),
        (6, "X_valid, y_valid = X[200:], y[200:]"),
        (11, "def valid_batches(bs=16):"), (12, "def evaluate(model):"),
        (16, "def train(epochs=3, lr=0.05, bs=32):")]
    assert sl.cells_used == [2, 3, 6, 11, 12, 16]  # not 5, 8, 9-10, 13, 15 (the draft)
    assert not [r for it in sl.items for r in it.reasons if "mutates" in r or "changes" in r
                or "gradients" in r]
    # The root: what each statement is read to change (the model, before any slicing).
    mutates = {(st.cell, st.source.strip().splitlines()[0]): set(st.facts.mutates)
               for st in build_model(load_notebook(str(path))).statements}
    assert mutates[(5, "x = x.to(device)")] == {"x"}
    assert mutates[(8, "loss.backward()")] == {"w"}  # its gradients; not `n_feat`, not `X` through it
    assert mutates[(10, "rows = sample_names(4)")] == set()  # not the builtins `len`, `range`
    assert mutates[(13, "probe = nn.Linear(n_feat, 1).to(device)")] == set()
    assert mutates[(13, "evaluate(probe)")] == {"probe"}  # `model.eval()`; not `device`
    got, _, _ = export_and_run(path, "train", tmp_path)
    assert ast.literal_eval(got) == ast.literal_eval(kernel["stateless"])


def test_stateful_values_keep_their_aliases(tmp_path):
    """The other side: a name bound to a list, dict, tensor or anything unknown is still changed
    through the names that share it, also after it held a state-less value, and a conditional
    binding to one does not make a name state-less."""
    path = write_nb(tmp_path, [
        "import torch\ndef make_config():\n    return {'hidden': 8}",
        "hidden = 8\nsizes = [hidden]\ngrow = sizes\ngrow.append(2)",
        "cfg = make_config()\nopts = cfg\nopts['hidden'] = 16",
        "n = 4\nn = [n]\nm = n\nm.append(5)",
        "scale = 2.0\nif torch.cuda.is_available():\n    scale = torch.ones(1)\nalias = scale\nalias.mul_(1)",
        "w = torch.zeros(3)\nv = w.view(-1)\nv.add_(1)",
        "def train():\n    return sizes, cfg['hidden'], n, scale, w.sum().item(), hidden",
    ])
    sl = slice_notebook(path, "train", at_run=False)
    assert [(c, s) for c, s in firsts(sl)] == [
        (1, "import torch"), (1, "def make_config():"),
        (2, "hidden = 8"), (2, "sizes = [hidden]"), (2, "grow = sizes"), (2, "grow.append(2)"),
        (3, "cfg = make_config()"), (3, "opts = cfg"), (3, "opts['hidden'] = 16"),
        (4, "n = 4"), (4, "n = [n]"), (4, "m = n"), (4, "m.append(5)"),
        (5, "scale = 2.0"), (5, "if torch.cuda.is_available():"), (5, "alias = scale"), (5, "alias.mul_(1)"),
        (6, "w = torch.zeros(3)"), (6, "v = w.view(-1)"), (6, "v.add_(1)"),
        (7, "def train():")]
    reasons = {(it.cell, it.source.strip().splitlines()[0]): it.reasons for it in sl.items}
    assert reasons[(2, "grow.append(2)")] == ["changes `grow`, which may share `sizes`, needed by `train`"]
    assert reasons[(4, "m.append(5)")] == ["changes `m`, which may share `n`, needed by `train`"]
    assert reasons[(5, "alias.mul_(1)")] == ["changes `alias`, which may share `scale`, needed by `train`"]


# ---- 2. IPython's builtins get a stand-in outside a kernel ---------------------------------------

PROGRESS = [
    "md:# Lesson 5: watching a model train",
    "import torch\nfrom torch import nn\nimport pandas as pd",
    "torch.manual_seed(0)\nX = torch.randn(128, 3)\ny = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3",
    "display(pd.DataFrame(X[:5].numpy(), columns=['a', 'b', 'c']))",
    "def show_progress(epoch, loss, every=2):\n    \"One line every few epochs: a rich display in Jupyter.\"\n"
    "    if epoch % every == 0:\n        display(f'epoch {epoch}: loss {loss:.4f}')",
    "def train(epochs=3):\n    model = nn.Linear(3, 1)\n    return model",
    "def train(epochs=4, lr=0.1):\n    if get_ipython() is None:\n        print('not in a kernel: plain output')\n"
    "    torch.manual_seed(1)\n    model = nn.Linear(3, 1)\n    opt = torch.optim.SGD(model.parameters(), lr=lr)\n"
    "    for epoch in range(epochs):\n        loss = ((model(X).squeeze(1) - y) ** 2).mean()\n"
    "        opt.zero_grad()\n        loss.backward()\n        opt.step()\n        show_progress(epoch, loss.item())\n"
    "    return round(loss.item(), 4)",
    "train()",
]


def test_ipython_builtins_get_a_stand_in_outside_a_kernel(tmp_path, kernel):
    path = write_nb(tmp_path, PROGRESS)
    sl = slice_notebook(path, "train")
    assert firsts(sl) == [
        (2, "import torch"), (2, "from torch import nn"),  # not pandas: only the display cell uses it
        (3, "torch.manual_seed(0)"), (3, "X = torch.randn(128, 3)"),
        (3, "y = X @ torch.tensor([1.0, -2.0, 0.5]) + 0.3"),
        (5, "def show_progress(epoch, loss, every=2):"), (7, "def train(epochs=4, lr=0.1):")]
    assert sl.cells_used == [2, 3, 5, 7]  # not the display cell 4, not the draft 6
    assert sl.ipython == {"display": "cell 5, line 4", "get_ipython": "cell 7, line 2"}
    # Said once, as a note, not as a warning; `get_ipython() is None` reads no name dynamically.
    assert sl.warnings == []
    report = mpify("deps", str(path), "--fn", "train", tmpdir=tmp_path / "tmproot").stdout
    assert report.endswith(
        "\n\nnote: cell 5, line 4: uses IPython's `display` (a builtin in a kernel only): the script "
        "imports it from IPython.display, which prints outside a kernel, or prints where IPython is "
        "not installed\nnote: cell 7, line 2: uses IPython's `get_ipython` (a builtin in a kernel "
        "only): the script imports it from IPython, which gives None outside a kernel, or defines "
        "one that gives None\n")
    assert "from IPython.display import display" in render_source(sl)
    # Before issue 25 the script died: "NameError: name 'get_ipython' is not defined".
    got, out, err = export_and_run(path, "train", tmp_path)
    assert ast.literal_eval(got) == ast.literal_eval(kernel["progress"])
    assert out.splitlines()[:3] == ["not in a kernel: plain output", "epoch 0: loss 3.1912",
                                    "epoch 2: loss 1.5617"]
    assert "mpify: warning: cell 5, line 4: uses IPython's `display`" in err
    script = path.parent / "train_exported.py"
    assert script.read_text().count("from IPython.display import display") == 1
    # Where IPython is not installed: the fallbacks print and give None.
    bare = tmp_path / "no_ipython"
    (bare / "IPython").mkdir(parents=True)
    (bare / "IPython" / "__init__.py").write_text("raise ImportError('IPython is not installed here')\n")
    (bare / "train.py").write_text(script.read_text())
    code, out2, err2 = forked_scripts().run(bare / "train.py", bare)
    assert code == 0, err2
    assert out2 == out
    # A slice that uses neither gets no stand-in.
    assert "IPython" not in render_source(slice_notebook(write_nb(tmp_path, STATELESS, "other.ipynb"), "train"))


# ---- 3. a refusal only for what the target needs ------------------------------------------------

CLASSIFIER = [
    "md:# Lesson 6: a small classifier, tested before and after training",
    "import torch\nfrom torch import nn\nimport torch.nn.functional as F",
    "torch.manual_seed(0)\nX_train = torch.randn(256, 8)\ny_train = (X_train[:, 0] + X_train[:, 1] > 0).long()\n"
    "X_test = torch.randn(64, 8)\ny_test = (X_test[:, 0] + X_test[:, 1] > 0).long()\nX_train.shape, y_train.sum()",
    "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))\nmodel",
    "def test(model, verbose=False):\n    model.eval()\n    with torch.no_grad():\n        preds = model(X_test).argmax(1)\n"
    "    if verbose:\n        for p, t in zip(preds[:4], y_test[:4]):\n            print(classes[p], classes[t])\n"
    "    return (preds == y_test).float().mean().item()",
    "md:Before training: about chance.",
    "test(model)",
    "def train(epochs=5, lr=0.1):\n    torch.manual_seed(1)\n    opt = torch.optim.SGD(model.parameters(), lr=lr)\n"
    "    for _ in range(epochs):\n        model.train()\n        for i in range(0, len(X_train), 32):\n"
    "            loss = F.cross_entropy(model(X_train[i:i + 32]), y_train[i:i + 32])\n"
    "            opt.zero_grad()\n            loss.backward()\n            opt.step()\n"
    "    return round(loss.item(), 4)",
    "result = train()\nresult",
    "test(model)",
]


def test_undefined_name_in_a_function_the_target_does_not_call(tmp_path, kernel):
    path = write_nb(tmp_path, CLASSIFIER)
    sl = slice_notebook(path, "train")
    # `test(model)` stays (its `model.eval()` changes the model `train` reads), and with it
    # `test`, whose `if verbose:` branch names `classes`, defined nowhere. The notebook ran that
    # call without it: the branch did not run. Before issue 25: "`classes` is used by `test`
    # (cell 5, line 7) but nothing defines it before that", and no slice at all.
    assert firsts(sl) == [
        (2, "import torch"), (2, "from torch import nn"), (2, "import torch.nn.functional as F"),
        (3, "torch.manual_seed(0)"), (3, "X_train = torch.randn(256, 8)"),
        (3, "y_train = (X_train[:, 0] + X_train[:, 1] > 0).long()"), (3, "X_test = torch.randn(64, 8)"),
        (3, "y_test = (X_test[:, 0] + X_test[:, 1] > 0).long()"),
        (4, "model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))"),
        (5, "def test(model, verbose=False):"), (7, "test(model)"), (8, "def train(epochs=5, lr=0.1):")]
    assert sl.warnings == [
        "cell 5, line 7: `classes` is used by `test` but nothing defines it before that; `test` runs "
        "at cell 7, line 1, not from `train`: kept as the notebook ran it, where the lines that read "
        "`classes` cannot have run"]
    got, _, err = export_and_run(path, "train", tmp_path)
    assert "`classes` is used by `test`" in err  # the warning, on export's stderr
    assert ast.literal_eval(got) == ast.literal_eval(kernel["classifier"])


def test_undefined_name_the_target_needs_names_the_chain(tmp_path):
    from mpify.analysis import UnresolvedNameError

    cells = CLASSIFIER[:4] + [
        "def evaluate(model, verbose=False):\n    model.eval()\n    with torch.no_grad():\n"
        "        preds = model(X_test).argmax(1)\n    if verbose:\n        print([classes[p] for p in preds[:4]])\n"
        "    return (preds == y_test).float().mean().item()",
        "def fit(epochs, lr):\n    opt = torch.optim.SGD(model.parameters(), lr=lr)\n    for _ in range(epochs):\n"
        "        model.train()\n        loss = F.cross_entropy(model(X_train), y_train)\n        opt.zero_grad()\n"
        "        loss.backward()\n        opt.step()\n    return evaluate(model, verbose=epochs > 10)",
        "def train(epochs=5, lr=0.1):\n    torch.manual_seed(1)\n    return round(fit(epochs, lr), 4)",
        "train()",
        "classes = ['neg', 'pos']",
    ]
    path = write_nb(tmp_path, cells)
    # `train` runs `evaluate` (through `fit`): `classes` is the target's to define, and the error
    # says through which functions it is needed (before issue 25: "`classes` is used by
    # `evaluate` (cell 5, line 6) but nothing defines it before that").
    with pytest.raises(UnresolvedNameError) as ei:
        slice_notebook(path, "train")
    assert str(ei.value) == (
        "`classes` is used by `evaluate` (cell 5, line 6), on the target's path `train` -> `fit` -> "
        "`evaluate`, but nothing defines it before that; it is only defined later, cell 9, line 1; "
        "the slice is taken before cell 8, line 1, where the notebook runs `train` (--cell K takes it "
        "as of a later cell)")
    assert (ei.value.cell, ei.value.lineno) == (5, 6)
    r = mpify("deps", str(path), "--fn", "evaluate", "--cell", "5", tmpdir=tmp_path / "tmproot")
    assert r.returncode == 2  # the target itself: the message is as it was
    assert r.stderr == ("mpify: error: `classes` is used by `evaluate` (cell 5, line 6) but nothing "
                        "defines it before that; it is only defined later, cell 9, line 1\n")
    # As of the end, where `classes` is defined, the slice is whole.
    sl = slice_notebook(path, "train", upto_cell=9)
    assert [c for c, _ in firsts(sl)][-2:] == [7, 9]


@pytest.mark.parametrize("cells, reader", [
    # A class made at top level: the target calls its method later.
    (["class Trainer:\n    def __init__(self, n):\n        self.n = n\n    def fit(self, verbose=False):\n"
      "        if verbose:\n            print(classes)\n        return self.n",
      "trainer = Trainer(3)", "def train():\n    return trainer.fit()"], "`Trainer` (cell 1, line 6)"),
    # A generator made at top level: its body runs when the target iterates it.
    (["def batches(n, verbose=False):\n    for i in range(n):\n        if verbose:\n            print(classes)\n"
      "        yield i", "it = batches(3)", "def train():\n    return sum(it)"], "`batches` (cell 1, line 4)"),
    # A closure made at top level: the target calls it.
    (["def make_logger(verbose=False):\n    def log(x):\n        if verbose:\n            print(classes)\n"
      "        return x\n    return log", "log = make_logger()", "def train():\n    return log(3)"],
     "`make_logger` (cell 1, line 4)"),
])
def test_undefined_name_in_code_that_runs_later_is_still_refused(tmp_path, cells, reader):
    """The other side: a statement that runs a function at top level runs all of it only for a
    plain function; what a class, a generator or a closure it makes runs later, from the target."""
    from mpify.analysis import UnresolvedNameError

    with pytest.raises(UnresolvedNameError) as ei:
        slice_notebook(write_nb(tmp_path, cells), "train", at_run=False)
    assert str(ei.value) == f"`classes` is used by {reader} but nothing defines it before that"


NOTEBOOKS = {"stateless": STATELESS, "progress": PROGRESS, "classifier": CLASSIFIER}
CALLS = {"stateless": "train()", "progress": "train()", "classifier": "result"}
