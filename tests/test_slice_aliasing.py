"""Slices that are sound under autograd and aliasing, and precise through the notebook's own
functions (issue 16), on notebooks written like course notebooks.

Each test asserts the exact slice (cell and first line of every kept statement), runs the rendered
slice as a script of its own (test_slice_course_notebooks.run_slice), and compares the target's result with the notebook's: run in a real
Jupyter kernel where the notebook trains (the manual step, the optimizer), else run whole as a
script.
"""
from __future__ import annotations

import ast

import nbformat
import pytest
from nbformat.v4 import new_code_cell

from mpify.analysis import slice_notebook
from test_analysis_differential import check_slice
from helpers import parallel
from test_slice_course_notebooks import LESSONTOOLS, MARK, kept, run_slice, run_whole, slice_and_whole, write_nb

torch = pytest.importorskip("torch")


def firsts(sl):
    """(cell, first line) of every kept statement, in order."""
    return [(c, s.splitlines()[0]) for c, s in kept(sl)]


@pytest.fixture(scope="module")
def kernel(shared_kernel, tmp_path_factory):
    """The training notebooks of this module run in one real kernel (the session's shared one,
    conftest.SharedKernel), one after the other with `%reset -f` between them (torch stays
    imported: no kernel start and one torch import for all), each followed by its calls. Returns {notebook: (values displayed by its `SHOWN`
    cells, values of its `CALLS`)}."""
    tmp = tmp_path_factory.mktemp("kernel")
    nb = nbformat.v4.new_notebook()
    spans = {}
    for name, cells in NOTEBOOKS.items():
        spans[name] = len(nb.cells)
        nb.cells += [new_code_cell("%reset -f")]
        nb.cells += nbformat.read(str(write_nb(tmp, cells, f"{name}.ipynb")), as_version=4).cells
        nb.cells += [new_code_cell(f"print({MARK!r} + repr({expr}))") for expr in CALLS[name]]
    shared_kernel.run(nb, tmp)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o["output_type"] == "error"]
    assert not errors, f"{errors[0]['ename']}: {errors[0]['evalue']}"
    out = {}
    for name, start in spans.items():
        cells = nb.cells[start + 1:start + 1 + len(NOTEBOOKS[name])]
        calls = nb.cells[start + 1 + len(NOTEBOOKS[name]):][:len(CALLS[name])]
        shown = [ast.literal_eval(next(o["data"]["text/plain"] for o in cells[k - 1].outputs
                                       if o["output_type"] == "execute_result")) for k in SHOWN[name]]
        printed = [ast.literal_eval("".join(o["text"] for o in c.outputs if o["output_type"] == "stream")
                                    .split(MARK)[-1].strip()) for c in calls]
        out[name] = (shown, printed)
    return out


# ---- 1. the manual step of a linear model from scratch (the crash) -----------------------

LINEAR = [
    "md:# Linear model and neural net from scratch\nWe don't have the Kaggle data here: a synthetic "
    "table with the same shape of problem.",
    "import torch, numpy as np\nfrom torch import tensor\n\nnp.set_printoptions(linewidth=140)\n"
    "torch.set_printoptions(linewidth=140, sci_mode=False, edgeitems=7)",
    "g = torch.Generator().manual_seed(0)\nt_indep = torch.rand(200, 4, generator=g)\n"
    "t_dep = (t_indep @ tensor([0.5, -0.3, 0.8, 0.1]) > 0.4).float()\n"
    "indep_cols = ['Age', 'SibSp', 'Parch', 'LogFare']\nt_indep.shape",
    "vals,indices = t_indep.max(dim=0)\nt_indep = t_indep / vals",
    "torch.manual_seed(442)\n\nn_coeff = t_indep.shape[1]\ncoeffs = torch.rand(n_coeff)-0.5\ncoeffs",
    "t_indep*coeffs",
    "preds = (t_indep*coeffs).sum(axis=1)\npreds[:10]",
    "loss = torch.abs(preds-t_dep).mean()\nloss",
    "def calc_preds(coeffs, indeps): return (indeps*coeffs).sum(axis=1)\n"
    "def calc_loss(coeffs, indeps, deps): return torch.abs(calc_preds(coeffs, indeps)-deps).mean()",
    "md:## Doing a gradient descent step",
    "coeffs.requires_grad_()",
    "loss = calc_loss(coeffs, t_indep, t_dep)\nloss",
    "loss.backward()",
    "coeffs.grad",
    "with torch.no_grad():\n    coeffs.sub_(coeffs.grad * 0.1)\n    coeffs.grad.zero_()\n"
    "    print(calc_loss(coeffs, t_indep, t_dep))",
    "def show_coeffs(): return dict(zip(indep_cols, [round(c, 4) for c in coeffs.tolist()]))",
    "show_coeffs()",
    "md:## Training the linear model",
    "trn_indep,val_indep = t_indep[:160],t_indep[160:]\ntrn_dep,val_dep = t_dep[:160],t_dep[160:]\n"
    "len(trn_indep),len(val_indep)",
    "def update_coeffs(coeffs, lr):\n    coeffs.sub_(coeffs.grad * lr)\n    coeffs.grad.zero_()",
    "def one_epoch(coeffs, lr):\n    loss = calc_loss(coeffs, trn_indep, trn_dep)\n    loss.backward()\n"
    "    with torch.no_grad(): update_coeffs(coeffs, lr)\n    print(f\"{loss:.3f}\", end=\"; \")",
    "def init_coeffs(): return (torch.rand(n_coeff)-0.5).requires_grad_()",
    "def train_model(epochs=30, lr=0.01):\n    torch.manual_seed(442)\n    coeffs = init_coeffs()\n"
    "    for i in range(epochs): one_epoch(coeffs, lr=lr)\n    return coeffs",
    "coeffs = train_model(18, lr=0.2)",
    "show_coeffs()",
    "md:## Measuring accuracy",
    "preds = calc_preds(coeffs, val_indep)\nresults = val_dep.bool()==(preds>0.5)\nresults[:16]",
    "def acc(coeffs): return (val_dep.bool()==(calc_preds(coeffs, val_indep)>0.5)).float().mean()\n"
    "acc(coeffs)",
]
# (train_model prints each epoch's loss on one line: a newline after it.)
TRAIN = "([round(c, 4) for c in train_model(5, lr=0.2).tolist()], print())[0]"


def test_manual_step_with_backward(tmp_path, kernel):
    path = write_nb(tmp_path, LINEAR)
    assert LINEAR[16] == "show_coeffs()"  # cell 17, compared with the kernel
    # Before issue 16 the slice of train_model kept the manual step (cell 15: `calc_loss(coeffs,
    # t_indep, ..)` read as changing t_indep) without `loss.backward()` (read as changing `loss`
    # only), and the script died at import: "unsupported operand type(s) for *: 'NoneType' and
    # 'float'". calc_loss changes nothing: the exploration through it is left out.
    head = [(2, "import torch"), (2, "from torch import tensor"),  # numpy is not needed
            (2, "torch.set_printoptions(linewidth=140, sci_mode=False, edgeitems=7)"),
            (3, "g = torch.Generator().manual_seed(0)"), (3, "t_indep = torch.rand(200, 4, generator=g)"),
            (3, "t_dep = (t_indep @ tensor([0.5, -0.3, 0.8, 0.1]) > 0.4).float()")]
    scale = [(4, "vals,indices = t_indep.max(dim=0)"), (4, "t_indep = t_indep / vals"),
             (5, "torch.manual_seed(442)"), (5, "n_coeff = t_indep.shape[1]")]
    helpers = [(9, "def calc_preds(coeffs, indeps): return (indeps*coeffs).sum(axis=1)"),
               (9, "def calc_loss(coeffs, indeps, deps): return torch.abs(calc_preds(coeffs, indeps)-deps).mean()")]
    train = slice_notebook(path, "train_model")
    assert firsts(train) == head + scale + helpers + [
        (19, "trn_indep,val_indep = t_indep[:160],t_indep[160:]"),
        (19, "trn_dep,val_dep = t_dep[:160],t_dep[160:]"),
        (20, "def update_coeffs(coeffs, lr):"), (21, "def one_epoch(coeffs, lr):"),
        (22, "def init_coeffs(): return (torch.rand(n_coeff)-0.5).requires_grad_()"),
        (23, "def train_model(epochs=30, lr=0.01):")]
    # The state after the manual step (`mpify deps --cell 17`): the step reads `coeffs.grad`, so
    # the backward that wrote it is kept, through `loss`, which was computed from `coeffs`.
    step = slice_notebook(path, "show_coeffs", upto_cell=17)
    assert firsts(step) == head + [(3, "indep_cols = ['Age', 'SibSp', 'Parch', 'LogFare']")] + scale + [
        (5, "coeffs = torch.rand(n_coeff)-0.5")] + helpers + [
        (11, "coeffs.requires_grad_()"), (12, "loss = calc_loss(coeffs, t_indep, t_dep)"),
        (13, "loss.backward()"), (15, "with torch.no_grad():"),
        (16, "def show_coeffs(): return dict(zip(indep_cols, [round(c, 4) for c in coeffs.tolist()]))")]
    backward = next(i for i in step.items if i.cell == 13)
    assert backward.reasons == ["writes the gradients of `coeffs` (a backward through `loss`, computed "
                                "from it), needed by `show_coeffs`"]
    for sl in (train, step):
        check_slice(sl)
    (shown,), (trained,) = kernel["linear"]
    (tmp_path / "train").mkdir()  # the two slices side by side, each its script in a folder
    got_step, got_train = parallel(lambda: run_slice(step, "show_coeffs()", tmp_path),
                                   lambda: run_slice(train, TRAIN, tmp_path / "train"))
    assert ast.literal_eval(got_step) == shown
    assert ast.literal_eval(got_train) == trained


# ---- 2. an optimizer built over a model, stepped while exploring ---------------------------------

OPTIM = [
    "import torch\nfrom torch import nn\nimport torch.nn.functional as F",
    "torch.manual_seed(0)\nX = torch.randn(64, 3)\ny = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1",
    "model = nn.Linear(3, 1)\nopt = torch.optim.SGD(model.parameters(), lr=0.1)",
    "md:One step by hand, on the first minibatch:",
    "xb, yb = X[:16], y[:16]\nloss = F.mse_loss(model(xb), yb)\nloss",
    "loss.backward()\nmodel.weight.grad",
    "opt.step()\nmodel.weight",
    "md:The gradients are still there: the loop below zeroes them after each step.",
    "def fit(epochs=3):\n    for epoch in range(epochs):\n        for i in range(0, len(X), 16):\n"
    "            loss = F.mse_loss(model(X[i:i+16]), y[i:i+16])\n            loss.backward()\n"
    "            opt.step()\n            opt.zero_grad()\n    return round(F.mse_loss(model(X), y).item(), 5)",
]


def test_optimizer_stepped_in_exploration(tmp_path, kernel):
    path = write_nb(tmp_path, OPTIM)
    sl = slice_notebook(path, "fit")
    # `opt.step()` changes `model` (the optimizer holds its parameters); `loss.backward()` wrote the
    # gradients the first step of `fit` adds to. Before issue 16 both were left out.
    assert firsts(sl) == [
        (1, "import torch"), (1, "from torch import nn"), (1, "import torch.nn.functional as F"),
        (2, "torch.manual_seed(0)"), (2, "X = torch.randn(64, 3)"),
        (2, "y = X @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1"),
        (3, "model = nn.Linear(3, 1)"), (3, "opt = torch.optim.SGD(model.parameters(), lr=0.1)"),
        (5, "xb, yb = X[:16], y[:16]"), (5, "loss = F.mse_loss(model(xb), yb)"),
        (6, "loss.backward()"), (7, "opt.step()"), (9, "def fit(epochs=3):")]
    reasons = {i.cell: i.reasons for i in sl.items if i.cell in (6, 7)}
    assert sorted(reasons[7]) == ["changes `opt`, which may share `model`, needed by `fit`",
                                  "mutates `opt`, needed by `fit`"]
    assert reasons[6][0].startswith("writes the gradients of `model` (a backward through `loss`")
    check_slice(sl)
    _, (want,) = kernel["optim"]
    assert ast.literal_eval(run_slice(sl, "fit(2)", tmp_path)) == want


NOTEBOOKS = {"linear": LINEAR, "optim": OPTIM}
CALLS = {"linear": [TRAIN], "optim": ["fit(2)"]}
SHOWN = {"linear": [17], "optim": []}  # cells whose displayed result is compared


# ---- 3. the notebook's own pure functions, called while exploring --------------------------------

def test_pure_helpers_left_out(tmp_path):
    (tmp_path / "lessontools.py").write_text(LESSONTOOLS)
    path = write_nb(tmp_path, [
        "from lessontools import *",
        "set_seed(42)\nthrees = torch.rand(50, 8, 8) * 0.5\nsevens = torch.rand(50, 8, 8) * 0.5 + 0.4\n"
        "valid_3_tens = torch.rand(20, 8, 8) * 0.5\nvalid_7_tens = torch.rand(20, 8, 8) * 0.5 + 0.4",
        "mean3 = threes.mean(0)\nmean7 = sevens.mean(0)",
        "a_3 = threes[1]\ndist_3_abs = (a_3 - mean3).abs().mean()\ndist_3_sqr = ((a_3 - mean3)**2).mean().sqrt()\n"
        "dist_3_abs,dist_3_sqr",
        "def mnist_distance(a,b): return (a-b).abs().mean((-1,-2))\nmnist_distance(a_3, mean3)",
        "valid_3_dist = mnist_distance(valid_3_tens, mean3)\nvalid_3_dist, valid_3_dist.shape",
        "def is_3(x): return mnist_distance(x,mean3) < mnist_distance(x,mean7)",
        "is_3(a_3), is_3(a_3).float()",
        "is_3(valid_3_tens)",
        "accuracy_3s = is_3(valid_3_tens).float().mean()\naccuracy_7s = (1 - is_3(valid_7_tens).float()).mean()\n"
        "accuracy_3s,accuracy_7s,(accuracy_3s+accuracy_7s)/2",
        "md:## Stochastic gradient descent",
        "train_x = torch.cat([threes, sevens]).view(-1, 64)\n"
        "train_y = torch.tensor([1]*len(threes) + [0]*len(sevens)).unsqueeze(1)\ntrain_x.shape,train_y.shape",
        "def init_params(size, std=1.0): return (torch.randn(size)*std).requires_grad_()",
        "def linear1(xb, weights, bias): return xb@weights + bias",
        "def mnist_loss(predictions, targets):\n    predictions = predictions.sigmoid()\n"
        "    return torch.where(targets==1, 1-predictions, predictions).mean()",
        "weights = init_params((64,1))\nbias = init_params(1)\n"
        "print(mnist_loss(linear1(train_x[:4], weights, bias), train_y[:4]))",
        "def baseline():\n    return round(((is_3(valid_3_tens).float().mean() + 1 - is_3(valid_7_tens).float().mean()) / 2).item(), 4)",
        "def train(epochs=5, lr=1.0):\n    set_seed(0)\n    weights, bias = init_params((64,1)), init_params(1)\n"
        "    for _ in range(epochs):\n        loss = mnist_loss(linear1(train_x, weights, bias), train_y)\n"
        "        loss.backward()\n        for p in (weights, bias):\n            p.data -= p.grad * lr\n"
        "            p.grad.zero_()\n    return round(loss.item(), 4)",
    ])
    data = [(1, "from lessontools import *"), (2, "set_seed(42)"), (2, "threes = torch.rand(50, 8, 8) * 0.5"),
            (2, "sevens = torch.rand(50, 8, 8) * 0.5 + 0.4"), (2, "valid_3_tens = torch.rand(20, 8, 8) * 0.5"),
            (2, "valid_7_tens = torch.rand(20, 8, 8) * 0.5 + 0.4")]
    # Before issue 16, is_3's body passing `x` and `mean3` to a notebook function read as changing
    # both: cells 4, 8, 9 and 10 were kept (and `a_3` for cell 8).
    base = slice_notebook(path, "baseline")
    assert firsts(base) == data + [
        (3, "mean3 = threes.mean(0)"), (3, "mean7 = sevens.mean(0)"),
        (5, "def mnist_distance(a,b): return (a-b).abs().mean((-1,-2))"),
        (7, "def is_3(x): return mnist_distance(x,mean3) < mnist_distance(x,mean7)"),
        (17, "def baseline():")]
    train = slice_notebook(path, "train")
    assert firsts(train) == data[:4] + [
        (12, "train_x = torch.cat([threes, sevens]).view(-1, 64)"),
        (12, "train_y = torch.tensor([1]*len(threes) + [0]*len(sevens)).unsqueeze(1)"),
        (13, "def init_params(size, std=1.0): return (torch.randn(size)*std).requires_grad_()"),
        (14, "def linear1(xb, weights, bias): return xb@weights + bias"),
        (15, "def mnist_loss(predictions, targets):"), (18, "def train(epochs=5, lr=1.0):")]
    for sl in (base, train):
        check_slice(sl)
    # the whole notebook and the two slices, three scripts (each slice writes its own: two folders)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "lessontools.py").write_text(LESSONTOOLS)
    want, *got = parallel(lambda: run_whole(path, "(baseline(), train(3))", tmp_path),
                          lambda: run_slice(base, "baseline()", tmp_path / "base"),
                          lambda: run_slice(train, "train(3)", tmp_path))
    for value in got:
        assert ast.literal_eval(value) in ast.literal_eval(want)


# ---- 4. a sampling demo that seeds, and a random-drawing helper before a seed --------------------

SAMPLING = [
    "import torch",
    'vocab = {"closer": 0, "every": 1, "effort": 2, "forward": 3, "inches": 4, "moves": 5, "pizza": 6,\n'
    '         "toward": 7, "you": 8}\ninverse_vocab = {v: k for k, v in vocab.items()}\n'
    "next_token_logits = torch.tensor([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])",
    "probas = torch.softmax(next_token_logits, dim=0)\nnext_token_id = torch.argmax(probas).item()\n"
    "print(inverse_vocab[next_token_id])",
    "def print_sampled_tokens(probas):\n    torch.manual_seed(123) # Manual seed for reproducibility\n"
    "    sample = [torch.multinomial(probas, num_samples=1).item() for i in range(1_000)]\n"
    "    sampled_ids = torch.bincount(torch.tensor(sample))\n    for i, freq in enumerate(sampled_ids):\n"
    "        print(f\"{freq} x {inverse_vocab[i]}\")\n\nprint_sampled_tokens(probas)",
    "def softmax_with_temperature(logits, temperature):\n    scaled_logits = logits / temperature\n"
    "    return torch.softmax(scaled_logits, dim=0)\n\n# Temperature values\ntemperatures = [1, 0.1, 5]\n"
    "scaled_probas = [softmax_with_temperature(next_token_logits, T) for T in temperatures]",
    "def noisy_logits(n=9): return torch.randn(n)\n\ndemo = noisy_logits()\nprint(softmax_with_temperature(demo, 1.0))",
    "torch.manual_seed(123)",
    "def generate(logits, steps=5, temperature=1.0):\n    out = []\n    for _ in range(steps):\n"
    "        probs = softmax_with_temperature(logits + 0.1 * noisy_logits(len(logits)), temperature)\n"
    "        out.append(inverse_vocab[torch.multinomial(probs, num_samples=1).item()])\n    return out",
    "extra = noisy_logits()",
]


def test_sampling_demo_and_draw_helper_before_seed(tmp_path):
    path = write_nb(tmp_path, SAMPLING)
    common = [(1, "import torch"), (2, 'vocab = {"closer": 0, "every": 1, "effort": 2, "forward": 3, "inches": 4, "moves": 5, "pizza": 6,'),
              (2, "inverse_vocab = {v: k for k, v in vocab.items()}"),
              (2, "next_token_logits = torch.tensor([4.51, 0.89, -1.90, 6.75, 1.63, -1.62, -1.89, 6.28, 1.79])"),
              (5, "def softmax_with_temperature(logits, temperature):"), (6, "def noisy_logits(n=9): return torch.randn(n)"),
              (7, "torch.manual_seed(123)"), (8, "def generate(logits, steps=5, temperature=1.0):")]
    # print_sampled_tokens seeds and draws: a draw. noisy_logits only draws. Their calls are left
    # out (before issue 16, `print_sampled_tokens(probas)` was kept as "mutates `torch`").
    sl = slice_notebook(path, "generate", extra_roots=("next_token_logits",))
    assert firsts(sl) == common
    check_slice(sl)
    words = ast.literal_eval(run_slice(sl, "generate(next_token_logits)", tmp_path))
    assert len(words) == 5 and set(words) <= {"closer", "every", "effort", "forward", "inches", "moves",
                                              "pizza", "toward", "you"}
    # Faithful: the draws after the last seed are kept (`extra = noisy_logits()`), those before it
    # (the demo's `noisy_logits()`, the sampling demo) are not: the notebook's own numbers.
    faithful = slice_notebook(path, "generate", extra_roots=("next_token_logits",), faithful=True)
    assert firsts(faithful) == common + [(9, "extra = noisy_logits()")]
    check_slice(faithful)
    call = "generate(next_token_logits)"
    sliced, whole = slice_and_whole(faithful, path, call, tmp_path)
    assert sliced == whole
