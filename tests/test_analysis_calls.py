"""mpify.analysis.calls read as plain AST: the `--call` text, and the notebook's own calls and
launches of a target with the replay each gives. Notebooks in the style of the ones users launch
from (accelerate, torch.multiprocessing, ignite), read without running anything."""
from __future__ import annotations

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mpify.analysis import load_notebook
from mpify.analysis.calls import CallExpressionError, best_call, find_target_calls, parse_call


def notebook(tmp_path, *sources):
    path = tmp_path / "nb.ipynb"
    cells = [new_markdown_cell("# Training")] + [new_code_cell(s) for s in sources]
    nbformat.write(new_notebook(cells=cells), str(path))
    return load_notebook(path)


def test_parse_call_reads_the_free_names_only():
    spec = parse_call(" train(model, cfg.epochs, lr=lrs[0] * 2, hooks=[h for h in hooks if h], f=lambda x: x + k) ")
    assert spec.target == "train"
    assert spec.names == ("cfg", "hooks", "k", "lrs", "model", "train")
    assert spec.source == "train(model, cfg.epochs, lr=lrs[0] * 2, hooks=[h for h in hooks if h], f=lambda x: x + k)"


@pytest.mark.parametrize("text", ["train", "model.fit(3)", "make()(3)", "train(x := 3)", "train(1); train(2)", "train("])
def test_parse_call_refuses_what_is_not_one_call_by_name(text):
    with pytest.raises(CallExpressionError):
        parse_call(text)


def test_the_last_call_after_the_final_definition_is_replayed(tmp_path):
    nb = notebook(tmp_path,
                  "def train(model):\n    return model",                   # cell 2: a draft
                  "train(draft_model)",                                    # cell 3: calls the draft
                  "def main():\n    mp.spawn(train, args=(m, 1), nprocs=4)",  # cell 4: inside a function
                  "def train(rank, model, epochs):\n    return epochs",   # cell 5: the final one
                  "args = (model, 3)\nnotebook_launcher(train, args, num_processes=world_size)")  # cell 6
    calls = find_target_calls(nb, "train")
    assert [(c.cell, c.form, c.in_def) for c in calls] == [(3, "call", False), (4, "mp.spawn", True),
                                                           (6, "notebook_launcher", False)]
    site = best_call(calls, (5, 1))
    assert (site.cell, site.replay, site.nprocs, site.rank_first) == (6, "train(*args)", "world_size", False)
    # before the final definition only the draft's call and the function-level launch exist:
    # a top-level call wins over one inside a function
    assert best_call(find_target_calls(nb, "train", upto_cell=4), (2, 1)).cell == 3


def test_spawn_replays_read_the_index_from_the_environment(tmp_path):
    nb = notebook(tmp_path, "import torch.multiprocessing as mp",
                  "def train(rank, model):\n    return rank",
                  "mp.spawn(train, args=(model,), nprocs=2)")
    assert find_target_calls(nb, "train")[0].replay == 'train(int(__import__("os").environ["LOCAL_RANK"]), model)'
    nb = notebook(tmp_path, "import os\nimport torch.multiprocessing as mp",
                  "def train(rank, model):\n    return rank",
                  "mp.spawn(train, args=(model,), nprocs=2)")
    replay = find_target_calls(nb, "train")[0].replay
    assert replay == 'train(int(os.environ["LOCAL_RANK"]), model)'
    assert parse_call(replay).names == ("int", "model", "os", "train")


def test_magics_and_broken_cells_do_not_hide_the_launch(tmp_path):
    nb = notebook(tmp_path, "%matplotlib inline\ndef train(model, epochs=1):\n    return epochs",
                  "def broken(:\n    pass",
                  "%%time\nranch(2, train, model, epochs=3, gather=True, timeout=60)")
    (site,) = find_target_calls(nb, "train")
    assert (site.cell, site.form, site.replay, site.nprocs) == (4, "ranch", "train(model, epochs=3)", "2")
