"""Slices that leave out looks at data and models, and the seeds of experiments the target does not
run (issue 25), on notebooks written like course lessons: peeks at a batch, a shape check with a
throwaway model, a forward pass in eval mode under `no_grad`, getters on a vocabulary; and a lesson
that seeds before each of its experiments.

Each test asserts the exact slice, exports it with `mpify export` as a user does, runs the script in
a fresh interpreter, and compares its printed result with what the notebook's own cells give in a
real Jupyter kernel. The other side of each rule (where the change is real and the statement stays)
is asserted beside it.
"""
from __future__ import annotations

import ast

import pytest

from mpify.analysis import slice_notebook
from test_slice_course_notebooks import write_nb
from test_slice_precision import export_and_run, firsts, notebook_results

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def kernel(shared_kernel, tmp_path_factory):
    """The notebooks of this module run in a real kernel, then the value each computed: {name: it}."""
    return notebook_results(shared_kernel, tmp_path_factory.mktemp("kernel"), NOTEBOOKS, RESULTS)


# ---- 1. looking at data or a model is not a change of it -----------------------------------------

PEEKS = [
    "md:# Lesson 4: a small CNN on (fake) digits",
    "import torch\nfrom torch import nn\nfrom torch.utils.data import DataLoader, TensorDataset",
    "torch.manual_seed(0)\nimages = torch.randn(512, 1, 8, 8)\nlabels = (images.mean((1, 2, 3)) > 0).long()\n"
    "train_ds = TensorDataset(images[:448], labels[:448])\nvalid_ds = TensorDataset(images[448:], labels[448:])",
    "class Vocab:\n    \"The class names, both ways.\"\n    def __init__(self, names):\n        self.itos = list(names)\n"
    "    def get_itos(self):\n        return self.itos\n    def lookup_indices(self, names):\n"
    "        return [self.itos.index(n) for n in names]\nvocab = Vocab(['dark', 'bright'])",
    "vocab.get_itos(), vocab.lookup_indices(['bright'])",
    "train_dl = DataLoader(train_ds, batch_size=64, shuffle=True)\nvalid_dl = DataLoader(valid_ds, batch_size=64)",
    "md:What does a batch look like?",
    "xb, yb = next(iter(train_dl))\nxb.shape, yb[:8]",
    "dataiter = iter(valid_dl)\nimgs, labs = next(dataiter)\nimgs.shape, [vocab.get_itos()[i] for i in labs[:4]]",
    "train_ds[0][0].unsqueeze(0).shape",
    "def make_model():\n    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),\n"
    "                         nn.Flatten(), nn.Linear(4 * 8 * 8, 2))",
    "md:Check the shapes with a throwaway model:",
    "def test_shapes():\n    m = make_model()\n    scores = m(torch.randn(3, 1, 8, 8))\n    print(scores.size())\ntest_shapes()",
    "torch.manual_seed(1)\nmodel = make_model()",
    "md:And what does the untrained model say?",
    "model.eval()\nwith torch.no_grad():\n    out = model(xb)\nout.argmax(1)[:8]",
    "def train(epochs=2):\n    model.train()\n    opt = torch.optim.SGD(model.parameters(), lr=0.1)\n"
    "    for _ in range(epochs):\n        for xb, yb in train_dl:\n"
    "            loss = nn.functional.cross_entropy(model(xb), yb)\n"
    "            opt.zero_grad()\n            loss.backward()\n            opt.step()\n"
    "    model.eval()\n    with torch.no_grad():\n"
    "        acc = sum((model(x).argmax(1) == y).sum().item() for x, y in valid_dl) / len(valid_ds)\n"
    "    return round(acc, 4), vocab.lookup_indices(['bright'])[0]",
    "result = train()\nresult",
]


def test_looks_at_data_and_models_left_out(tmp_path, kernel):
    path = write_nb(tmp_path, PEEKS)
    sl = slice_notebook(path, "train")
    # Before: the peek at a validation batch (cell 9: "changes `dataiter`, which may share
    # `valid_dl`"), the forward pass of cell 16 ("calls `model`, which may change it") and the batch
    # it looked at (cell 8), and the vocabulary's getters (cell 5: "mutates `vocab`").
    assert firsts(sl) == [
        (2, "import torch"), (2, "from torch import nn"),
        (2, "from torch.utils.data import DataLoader, TensorDataset"),
        (3, "torch.manual_seed(0)"), (3, "images = torch.randn(512, 1, 8, 8)"),
        (3, "labels = (images.mean((1, 2, 3)) > 0).long()"),
        (3, "train_ds = TensorDataset(images[:448], labels[:448])"),
        (3, "valid_ds = TensorDataset(images[448:], labels[448:])"),
        (4, "class Vocab:"), (4, "vocab = Vocab(['dark', 'bright'])"),
        (6, "train_dl = DataLoader(train_ds, batch_size=64, shuffle=True)"),
        (6, "valid_dl = DataLoader(valid_ds, batch_size=64)"),
        (11, "def make_model():"),
        (14, "torch.manual_seed(1)"), (14, "model = make_model()"),
        # `model.eval()` stays: it does change the model (train() sets the mode back first thing,
        # which the analyzer does not read)
        (16, "model.eval()"),
        (17, "def train(epochs=2):")]
    got, _, _ = export_and_run(path, "train", tmp_path)
    assert ast.literal_eval(got) == ast.literal_eval(kernel["peeks"])


@pytest.mark.parametrize("cells, kept", [
    # `iter(..)` of an iterator is the iterator itself: a peek advances the generator `train` reads.
    (["def batches():\n    yield from range(10)", "gen = batches()", "it = iter(gen)\nnext(it)",
      "def train():\n    return list(gen)"], ["it = iter(gen)", "next(it)"]),
    # A notebook class that defines `__next__` makes iterators.
    (["class Counter:\n    def __init__(self):\n        self.n = 0\n    def __iter__(self):\n        return self\n"
      "    def __next__(self):\n        self.n += 1\n        return self.n", "c = Counter()", "it = iter(c)\nnext(it)",
      "def train():\n    return c.n"], ["it = iter(c)", "next(it)"]),
    # A forward pass in train mode under no_grad updates a BatchNorm's running statistics.
    (["import torch\nmodel = torch.nn.BatchNorm1d(2)", "with torch.no_grad():\n    model(torch.ones(4, 2))",
      "def train():\n    return model.running_mean.tolist()"], ["with torch.no_grad():"]),
    # Without no_grad, the output carries a graph a later backward runs through.
    (["import torch\nmodel = torch.nn.Linear(2, 1)", "model.eval()", "out = model(torch.ones(1, 2))",
      "def train():\n    return model.weight.tolist()"], ["model.eval()", "out = model(torch.ones(1, 2))"]),
    # Back in train mode (through any name: `.train()` anywhere ends eval mode).
    (["import torch\nmodel = torch.nn.BatchNorm1d(2)\nalias = model", "model.eval()", "alias.train()",
      "with torch.no_grad():\n    model(torch.ones(4, 2))", "def train():\n    return model.running_mean.tolist()"],
     ["model.eval()", "alias.train()", "with torch.no_grad():"]),
    # Back in train mode through a notebook function and an alias.
    (["import torch\nmodel = torch.nn.BatchNorm1d(2)\nalias = model",
      "def fit(m):\n    m.train()", "model.eval()", "fit(alias)",
      "with torch.no_grad():\n    model(torch.ones(4, 2))", "def train():\n    return model.running_mean.tolist()"],
     ["model.eval()", "fit(alias)", "with torch.no_grad():"]),
    # A getter that pops is not a query.
    (["import queue\nq = queue.Queue()\nq.put(1)", "q.get_nowait()", "def train():\n    return q.qsize()"],
     ["q.get_nowait()"]),
])
def test_changes_that_look_like_looks_are_kept(tmp_path, cells, kept):
    sl = slice_notebook(write_nb(tmp_path, cells), "train", at_run=False)
    firsts_kept = [src for _, src in firsts(sl)]
    for line in kept:
        assert line in firsts_kept, (line, firsts_kept)


# ---- 2. the seeds of the experiments the target does not run are left out ------------------------

SEEDS = [
    "md:# 02. Experiments: which model fits best?\nEach experiment starts from the same seed, so they compare.",
    "import random\nimport numpy as np\nimport torch\nfrom torch import nn",
    "random.seed(42)\nnp.random.seed(42)\ntorch.manual_seed(42)\ntorch.cuda.manual_seed(42)",
    "X = torch.randn(200, 3)\ny = (X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(200)).unsqueeze(1)\nX[:3], y[:3]",
    "noise = np.random.normal(size=5)\nrandom.choice(['a', 'b'])",
    "def fit(model, epochs, lr=0.05):\n    opt = torch.optim.SGD(model.parameters(), lr=lr)\n    for _ in range(epochs):\n"
    "        loss = nn.functional.mse_loss(model(X), y)\n        opt.zero_grad()\n        loss.backward()\n"
    "        opt.step()\n    return round(loss.item(), 4)",
    "md:## Model 0: a linear baseline",
    "torch.manual_seed(42)\nmodel_0 = nn.Linear(3, 1)\nmodel_0.state_dict()",
    "torch.manual_seed(42)\ntorch.cuda.manual_seed(42)\nresults_0 = fit(model_0, 20)\nresults_0",
    "md:## Model 0 again, with momentum (another training function)",
    "def fit_momentum(model, epochs, lr=0.05):\n    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)\n"
    "    for _ in range(epochs):\n        loss = nn.functional.mse_loss(model(X + 0.01 * torch.randn_like(X)), y)\n"
    "        opt.zero_grad()\n        loss.backward()\n        opt.step()\n    return round(loss.item(), 4)",
    "torch.manual_seed(42)\nmodel_m = nn.Linear(3, 1)\nresults_m = fit_momentum(model_m, 20)\nresults_m",
    "md:## Model 1: one hidden layer",
    "torch.manual_seed(42)\nmodel_1 = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))",
    "torch.manual_seed(42)\nresults_1 = fit(model_1, 30)\nresults_1",
    "md:Compare:",
    "print(results_0, results_1)",
]


def test_seeds_of_other_experiments_left_out(tmp_path, kernel):
    path = write_nb(tmp_path, SEEDS)
    sl = slice_notebook(path, "fit", extra_roots=["model_1"], replay="fit(model_1, 30)")
    # Before: every seed of `torch` before the call was kept (cells 8, 9 and 12 too, "used by
    # `fit`"), and `random.seed`, `np.random.seed` for a target that draws from neither. The other
    # experiments (cells 8-12: another model, another training function, their runs) stay out. The seed before
    # `model_1` stays although that statement never names `torch`: `nn.Linear` initialises its
    # weights from torch's generator (a name imported from torch reads its seeds).
    assert firsts(sl) == [
        (2, "import torch"), (2, "from torch import nn"),
        (3, "torch.manual_seed(42)"), (3, "torch.cuda.manual_seed(42)"),
        (4, "X = torch.randn(200, 3)"),
        (4, "y = (X @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(200)).unsqueeze(1)"),
        (6, "def fit(model, epochs, lr=0.05):"),
        (14, "torch.manual_seed(42)"),
        (14, "model_1 = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))"),
        (15, "torch.manual_seed(42)")]
    got, _, _ = export_and_run(path, "fit", tmp_path, "--call", "fit(model_1, 30)")
    assert ast.literal_eval(got) == ast.literal_eval(kernel["seeds"])


def test_seeds_that_still_decide_a_draw_are_kept(tmp_path):
    """The other side: a device seed does not end the walk (the CPU generator's seed before it
    stays); a seed by a function, which may do more than seed, does not either; a seed-everything
    call decides what torch draws; draws by other packages read their generator's seeds."""
    cells = ["import torch\nimport numpy as np\nimport pytorch_lightning as pl\nfrom sklearn.utils import shuffle",
             "torch.manual_seed(0)", "torch.cuda.manual_seed(1)",
             "def set_seeds(s):\n    torch.manual_seed(s)\n    torch.set_default_dtype(torch.float64)", "set_seeds(3)",
             "np.random.seed(4)", "rows = shuffle(list(range(5)))",
             "pl.seed_everything(5)", "w = torch.nn.Linear(2, 2)",
             "torch.manual_seed(6)",
             "def train():\n    return torch.randn(1), rows, w"]
    sl = slice_notebook(write_nb(tmp_path, cells), "train", at_run=False)
    assert [src for _, src in firsts(sl)] == [
        "import torch", "import numpy as np", "import pytorch_lightning as pl", "from sklearn.utils import shuffle",
        # (read by `w` before `pl.seed_everything(5)` is seen to seed torch too: conservative)
        "torch.manual_seed(0)", "torch.cuda.manual_seed(1)",
        "def set_seeds(s):", "set_seeds(3)", "np.random.seed(4)", "rows = shuffle(list(range(5)))",
        "pl.seed_everything(5)", "w = torch.nn.Linear(2, 2)", "torch.manual_seed(6)", "def train():"]


NOTEBOOKS = {"peeks": PEEKS, "seeds": SEEDS}
RESULTS = {"peeks": "result", "seeds": "results_1"}
