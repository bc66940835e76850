"""`mpify deps --why CELL[:LINE]`: why a statement is kept or left out, in one command (issue 25).

On a lesson notebook with every kind of answer: a kept statement (its reasons), a display line, an
exploration binding nobody reads, a superseded value hidden by a later binding, the notebook's run
of the target, a statement that reads what that run made, a cell after the point, a markdown cell;
and a malformed --why is a one-line error.
"""
from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from export_helpers import mpify

CELLS = [
    new_markdown_cell("# Lesson 2: fitting a line"),                                  # 1
    new_code_cell("import torch"),                                                    # 2
    new_code_cell("lr = 0.5\nX = torch.linspace(0, 1, 32).unsqueeze(1)\ny = 3 * X + 1"),  # 3
    new_code_cell("X.shape\npeek = X[:4]\nprint(peek)"),                              # 4
    new_code_cell("lr = 0.1  # the first try diverged"),                              # 5
    new_code_cell("def train(steps=100):\n    w = torch.zeros(1, requires_grad=True)\n"
                  "    b = torch.zeros(1, requires_grad=True)\n"
                  "    for _ in range(steps):\n        loss = ((X * w + b - y) ** 2).mean()\n"
                  "        loss.backward()\n        with torch.no_grad():\n"
                  "            w -= lr * w.grad\n            b -= lr * b.grad\n"
                  "            w.grad.zero_()\n            b.grad.zero_()\n"
                  "    return w.item(), b.item()"),                                    # 6
    new_code_cell("w, b = train()"),                                                  # 7
    new_code_cell("fit = X * w + b"),                                                 # 8
    new_code_cell("lr = 1.0"),                                                        # 9
]


def _deps(tmp_path, tmpdir_, *args):
    path = tmp_path / "lesson2.ipynb"
    nbformat.write(new_notebook(cells=CELLS), path)
    return mpify("deps", path, "--fn", "train", *args, tmpdir=tmpdir_)


def test_why_answers_for_kept_and_left_out_statements(tmp_path, tmpdir_):
    r = _deps(tmp_path, tmpdir_, "--why", "3")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "cell 3, line 1: lr = 0.5",
        "    left out: it binds `lr`, but cell 5, line 1 binds `lr` again before the target's statements read it",
        "cell 3, line 2: X = torch.linspace(0, 1, 32).unsqueeze(1)",
        "    kept: defines `X`, needed by `train`",
        "cell 3, line 3: y = 3 * X + 1",
        "    kept: defines `y`, needed by `train`",
    ]
    r = _deps(tmp_path, tmpdir_, "--why-not", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "cell 4, line 1: X.shape",
        "    left out: it binds nothing and changes nothing the analyzer knows of (a display, a print, "
        "a look at data): nothing the target needs can depend on it",
        "cell 4, line 2: peek = X[:4]",
        "    left out: it binds `peek`, which nothing the target needs reads after it",
        "cell 4, line 3: print(peek)",
        "    left out: it binds nothing and changes nothing the analyzer knows of (a display, a print, "
        "a look at data): nothing the target needs can depend on it",
    ]


def test_why_names_the_run_what_follows_it_and_the_point(tmp_path, tmpdir_):
    r = _deps(tmp_path, tmpdir_, "--why", "7")
    assert r.stdout.splitlines()[1] == "    left out: it is the notebook's run of `train` that the slice is taken just before"
    r = _deps(tmp_path, tmpdir_, "--why", "8:1")
    assert r.stdout.splitlines()[1] == ("    left out: it comes after the point the slice is taken at: "
                                        "cell 7, line 1, where the notebook runs it: w, b = train()")
    # as of the end of the notebook: the run is left out as a run, what it made goes with it
    r = _deps(tmp_path, tmpdir_, "--why", "7", "--cell", "9")
    assert r.stdout.splitlines()[1] == "    left out: it runs `train` (a call or a launch): the slice never runs its target"
    r = _deps(tmp_path, tmpdir_, "--why", "8", "--cell", "9")
    assert r.stdout.splitlines()[1] == ("    left out: it reads `w`, which cell 7, line 1 makes by running "
                                        "`train`: left out with that run")
    r = _deps(tmp_path, tmpdir_, "--why", "9", "--cell", "9")
    assert r.stdout.splitlines()[1] == "    kept: defines `lr`, needed by `train`"


def test_why_on_a_markdown_cell_and_bad_input(tmp_path, tmpdir_):
    r = _deps(tmp_path, tmpdir_, "--why", "1")
    assert r.returncode == 0 and r.stdout.startswith("cell 1: no code statement there")
    r = _deps(tmp_path, tmpdir_, "--why", "3:x")
    assert r.returncode == 2
    assert r.stderr.strip() == "mpify: error: --why takes CELL or CELL:LINE (numbers, as `mpify deps` shows them), not '3:x'"
