"""Files a target reads: the statements that wrote them are in its slice (issue 25's validation
set: most needed statements the slices left out were a download and its extraction).

A custom-datasets lesson: a folder made if missing, an archive fetched (here written, without a
network) and extracted, a helper module saved by a literal path and imported, a look at the
folders, plots saved elsewhere, and a target that reads the files through a path built from the
data folder. The slice is exported with `mpify export` and run in a folder where the notebook never
ran, so every file it reads must come from the statements it kept; its result is compared with the
notebook's own, run in a real Jupyter kernel.
"""
from __future__ import annotations

import ast

import pytest

from mpify.analysis import slice_notebook
from mpify.analysis.whynot import explain
from test_slice_course_notebooks import write_nb
from test_slice_precision import export_and_run, firsts, notebook_results

FILES = [
    "md:# 04. Custom datasets\nFirst get the data: a zip of two folders of numbers.",
    "import os\nimport zipfile\nfrom pathlib import Path",
    "data_path = Path('data/')\nimage_path = data_path / 'pizza_steak_sushi'\n"
    "if image_path.is_dir():\n    print(f'{image_path} exists')\nelse:\n    image_path.mkdir(parents=True, exist_ok=True)",
    "with zipfile.ZipFile(data_path / 'pizza_steak_sushi.zip', 'w') as z:  # stands for the download\n"
    "    z.writestr('train/a.txt', '1 2 3')\n    z.writestr('test/b.txt', '4 5')",
    "with zipfile.ZipFile(data_path / 'pizza_steak_sushi.zip', 'r') as zip_ref:\n    zip_ref.extractall(image_path)",
    "for dirpath, dirnames, filenames in os.walk(image_path):\n    print(dirpath, filenames)",
    "md:Some helpers, saved as a module:",
    "with open('helper_functions.py', 'w') as f:\n    f.write('def total(xs):\\n    return sum(xs)\\n')",
    "from helper_functions import total",
    "plot_dir = Path('plots')\nplot_dir.mkdir(exist_ok=True)\n(plot_dir / 'numbers.txt').write_text('a plot')",
    "train_dir = image_path / 'train'\ntest_dir = image_path / 'test'",
    "def train():\n    nums = [float(x) for f in sorted(train_dir.iterdir()) for x in f.read_text().split()]\n"
    "    return total(nums), len(list(test_dir.iterdir()))",
    "result = train()\nresult",
]


def test_the_statements_that_write_what_the_target_reads_are_kept(tmp_path, shared_kernel, tmp_path_factory):
    path = write_nb(tmp_path, FILES)
    sl = slice_notebook(path, "train")
    # Before: neither the archive nor its extraction nor the helper module's file (cells 4, 5, 8):
    # the script failed where the notebook had not run. The look at the folders (cell 6) and the
    # plots (cell 10) stay out.
    assert firsts(sl) == [
        (2, "import zipfile"), (2, "from pathlib import Path"),
        (3, "data_path = Path('data/')"), (3, "image_path = data_path / 'pizza_steak_sushi'"),
        (3, "if image_path.is_dir():"),
        (4, "with zipfile.ZipFile(data_path / 'pizza_steak_sushi.zip', 'w') as z:  # stands for the download"),
        (5, "with zipfile.ZipFile(data_path / 'pizza_steak_sushi.zip', 'r') as zip_ref:"),
        (8, "with open('helper_functions.py', 'w') as f:"), (9, "from helper_functions import total"),
        (11, "train_dir = image_path / 'train'"), (11, "test_dir = image_path / 'test'"),
        (12, "def train():")]
    reasons = {it.cell: it.reasons for it in sl.items}
    assert "writes files under data, which `train` reads" in reasons[5]
    assert explain(sl, 10, 3) == ["cell 10, line 3: (plot_dir / 'numbers.txt').write_text('a plot')",
                                  "    left out: it writes files under plots, which nothing the target needs "
                                  "reads after it"]
    got, _, _ = export_and_run(path, "train", tmp_path)
    assert not (tmp_path / "plots").exists()
    want = notebook_results(shared_kernel, tmp_path_factory.mktemp("kernel"), {"files": FILES}, {"files": "result"})
    assert ast.literal_eval(got) == ast.literal_eval(want["files"])


@pytest.mark.parametrize("cells, kept", [
    # a download by a path built in a loop (`os.path.join(CHECKPOINT_PATH, name)`)
    (["import os, urllib.request\nCHECKPOINT_PATH = 'saved_models'",
      "for name in ['a.ckpt']:\n    file_path = os.path.join(CHECKPOINT_PATH, name)\n"
      "    if not os.path.isfile(file_path):\n        urllib.request.urlretrieve('https://x/' + name, file_path)",
      "def train():\n    return os.listdir(CHECKPOINT_PATH)"], "for name in ['a.ckpt']:"),
    # a checkpoint saved, then read by a literal path under the same folder
    (["import torch\nw = torch.zeros(2)", "torch.save(w, 'ckpt/w.pt')",
      "def train():\n    return torch.load('ckpt/w.pt')"], "torch.save(w, 'ckpt/w.pt')"),
])
def test_writes_reached_through_loops_and_literal_paths(tmp_path, cells, kept):
    sl = slice_notebook(write_nb(tmp_path, cells), "train", at_run=False)
    assert kept in [src for _, src in firsts(sl)]


def test_saving_an_object_is_not_a_write_under_its_name(tmp_path):
    """`torch.save(model, p)`: the object saved is not a path; later readers of `model` do not
    keep the save."""
    cells = ["import torch\nmodel = torch.nn.Linear(2, 1)", "torch.save(model, 'model.pt')",
             "def train():\n    return model.weight.shape"]
    sl = slice_notebook(write_nb(tmp_path, cells), "train", at_run=False)
    assert [src for _, src in firsts(sl)] == ["import torch", "model = torch.nn.Linear(2, 1)", "def train():"]
