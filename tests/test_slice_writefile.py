"""`%%writefile` lessons (issue 25): cells write modules that later cells import, as in a "going
modular" chapter. The slice keeps the cells that write what its imports load (also a package's
submodule, `from going_modular import data_setup`) and none of the others (a command-line script,
a predict script), and the written folder is made if the notebook made it in a cell left out.

The slice is exported with `mpify export` and run in a folder where the notebook never ran (the
modules do not exist there until the slice writes them); its result is compared with the
notebook's own, run in a real Jupyter kernel.
"""
from __future__ import annotations

import ast

import pytest

from mpify.analysis import slice_notebook
from mpify.analysis.whynot import explain
from test_slice_course_notebooks import write_nb
from test_slice_precision import export_and_run, firsts, notebook_results

torch = pytest.importorskip("torch")

MODULAR = [
    "md:# 05. Going modular: cell mode\nEach part of the code goes to a file of its own, then we import it.",
    "import os\nos.makedirs('going_modular', exist_ok=True)",
    "%%writefile going_modular/data_setup.py\n\"\"\"Make the data.\"\"\"\nimport torch\n\n\n"
    "def make_data(n=64, seed=0):\n    g = torch.Generator().manual_seed(seed)\n"
    "    X = torch.randn(n, 2, generator=g)\n    return X, (X.sum(1) > 0).long()\n",
    "%%writefile going_modular/model_builder.py\n\"\"\"The model.\"\"\"\nfrom torch import nn\n\n\n"
    "def build(hidden=8):\n    return nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 2))\n",
    "md:A script to predict with a saved model, and one to train from the command line:",
    "%%writefile going_modular/predict.py\n\"\"\"Predict with a saved model.\"\"\"\nimport sys\nprint('predicting', sys.argv)\n",
    "%%writefile going_modular/train.py\n\"\"\"Train from the command line.\"\"\"\n"
    "from going_modular import data_setup, model_builder\nprint('a script')\n",
    "from going_modular import data_setup, model_builder\nimport torch",
    "X, y = data_setup.make_data()\nX.shape",
    "def train(epochs=5):\n    torch.manual_seed(0)\n    model = model_builder.build()\n"
    "    opt = torch.optim.SGD(model.parameters(), lr=0.1)\n    for _ in range(epochs):\n"
    "        loss = torch.nn.functional.cross_entropy(model(X), y)\n        opt.zero_grad()\n"
    "        loss.backward()\n        opt.step()\n    return round(loss.item(), 4)",
    "result = train()\nresult",
]


def test_a_going_modular_lesson_keeps_the_modules_it_imports(tmp_path, shared_kernel, tmp_path_factory):
    path = write_nb(tmp_path, MODULAR)
    sl = slice_notebook(path, "train")
    # Before: no %%writefile cell at all (the import named `going_modular`, the cells wrote
    # `data_setup.py` and `model_builder.py` inside it): the script died with ModuleNotFoundError
    # wherever the notebook had not run.
    assert firsts(sl) == [
        (3, "__import__('os').makedirs('going_modular', exist_ok=True)"),
        (4, "__import__('os').makedirs('going_modular', exist_ok=True)"),
        (8, "from going_modular import data_setup, model_builder"), (8, "import torch"),
        (9, "X, y = data_setup.make_data()"), (10, "def train(epochs=5):")]
    reasons = {it.cell: it.reasons for it in sl.items}
    assert reasons[3] == ["writes going_modular/data_setup.py, needed by `data_setup`, `model_builder`"]
    assert explain(sl, 6)[1:] == ["    left out: it binds the module file going_modular/predict.py, which "
                                  "nothing the target needs reads after it"]
    assert not (tmp_path / "going_modular").exists()
    got, _, _ = export_and_run(path, "train", tmp_path)
    assert sorted(p.name for p in (tmp_path / "going_modular").iterdir() if p.suffix == ".py") == [
        "data_setup.py", "model_builder.py"]
    want = notebook_results(shared_kernel, tmp_path_factory.mktemp("kernel"), {"modular": MODULAR},
                            {"modular": "result"})
    assert ast.literal_eval(got) == ast.literal_eval(want["modular"])


@pytest.mark.parametrize("path, imports, name, kept", [
    ("helper.py", "import helper", "helper", True),
    ("pkg/__init__.py", "import pkg", "pkg", True),
    ("pkg/sub.py", "import pkg.sub", "pkg", True),
    ("pkg/sub.py", "from pkg import sub", "sub", True),
    ("pkg/sub.py", "from pkg.sub import f", "f", True),
    ("pkg/sub.py", "import pkg", "pkg", False),  # `import pkg` alone does not load pkg.sub
    ("other/sub.py", "from pkg import sub", "sub", False),
])
def test_which_written_module_an_import_loads(tmp_path, path, imports, name, kept):
    cells = [f"%%writefile {path}\ndef f():\n    return 1\n", imports, f"def train():\n    return {name}"]
    sl = slice_notebook(write_nb(tmp_path, cells), "train", at_run=False)
    assert (1 in [it.cell for it in sl.items]) == kept
