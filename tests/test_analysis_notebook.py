"""Loading notebooks: .ipynb (v4, v3 upgraded), `# %%` Python files, and one-line typed errors."""
from __future__ import annotations

import json

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from mpify.analysis import (AnalysisError, NotebookError, load_notebook, render_source,
                            slice_notebook)


def test_load_v4_cells_numbered_among_all_cells(tmp_path):
    nb = new_notebook(cells=[new_markdown_cell("# t"), new_code_cell("x = 1"), new_code_cell("y = 2")])
    nb.cells[1].execution_count = 3
    p = tmp_path / "a.ipynb"
    nbformat.write(nb, str(p))
    got = load_notebook(p)
    assert got.path == str(p)
    assert [(c.index, c.kind, c.source, c.execution_count) for c in got.cells] == [
        (1, "markdown", "# t", None), (2, "code", "x = 1", 3), (3, "code", "y = 2", None)]


def test_load_v3_is_upgraded(tmp_path):
    v3 = {"nbformat": 3, "nbformat_minor": 0, "metadata": {"name": ""},
          "worksheets": [{"cells": [
              {"cell_type": "markdown", "metadata": {}, "source": ["# old"]},
              {"cell_type": "code", "language": "python", "input": ["x = 1\n", "def f():\n", "    return x"],
               "outputs": [], "prompt_number": 1, "metadata": {}, "collapsed": False}],
              "metadata": {}}]}
    p = tmp_path / "old.ipynb"
    p.write_text(json.dumps(v3))
    nb = load_notebook(p)
    assert [c.kind for c in nb.cells] == ["markdown", "code"]
    assert nb.cells[1].execution_count == 1
    s = slice_notebook(nb, "f")
    assert [i.cell for i in s.items] == [2, 2]


def test_load_percent_script(tmp_path):
    p = tmp_path / "nb.py"
    p.write_text("# %%\nimport math\n\n# %% [markdown]\n# # Title\n\n# %%\nK = 2\n\n"
                 "def f():\n    return math.pi * K\n")
    nb = load_notebook(p)
    assert [(c.index, c.kind) for c in nb.cells] == [(1, "code"), (2, "markdown"), (3, "code")]
    s = slice_notebook(p, "f")
    assert [(i.cell, i.lineno) for i in s.items] == [(1, 1), (3, 1), (3, 3)]
    compile(render_source(s), "<s>", "exec")


def test_percent_script_header_before_first_marker_is_a_cell(tmp_path):
    p = tmp_path / "nb.py"
    p.write_text("X = 1\n# %%\ndef f():\n    return X\n")
    s = slice_notebook(p, "f")
    assert [(i.cell, i.lineno) for i in s.items] == [(1, 1), (2, 1)]


@pytest.mark.parametrize("content, match", [
    (None, "no such file"),
    ("hello, not json", "is not JSON"),
    ('{"a": 1}', "not a notebook"),
    ('[1, 2]', "not a notebook"),
    ('{"nbformat": 4, "nbformat_minor": 5, "cells": [{"cell_type": "code", "source": "x"}]}',
     "not a valid notebook"),
])
def test_errors_are_one_line(tmp_path, content, match):
    p = tmp_path / "bad.ipynb"
    if content is not None:
        p.write_text(content)
    with pytest.raises(NotebookError, match=match) as ei:
        load_notebook(p)
    assert isinstance(ei.value, AnalysisError)
    assert "\n" not in str(ei.value)
    assert str(p) in str(ei.value)


def test_directory_is_an_error(tmp_path):
    with pytest.raises(NotebookError, match="directory"):
        load_notebook(tmp_path)


def test_slice_notebook_accepts_path_and_notebook(tmp_path):
    nb = new_notebook(cells=[new_code_cell("x = 1\ndef f():\n    return x")])
    p = tmp_path / "a.ipynb"
    nbformat.write(nb, str(p))
    a = slice_notebook(str(p), "f")
    b = slice_notebook(load_notebook(p), "f")
    assert a.to_dict() == b.to_dict()
    d = a.to_dict()
    assert d["target"] == "f" and d["target_kind"] == "function" and d["cells_used"] == [1]
    assert [it["lineno"] for it in d["items"]] == [1, 2]
    json.dumps(d)


def test_ranch_cells_are_read_as_rank_0_runs_them(tmp_path):
    """A `%%ranch` cell runs in the kernel as rank 0, so a function it defines can be sliced; one
    limited to other ranks leaves nothing in the kernel."""
    nb = new_notebook(cells=[
        new_code_cell("%load_ext mpify\n%mpify start 2 --ddp"),
        new_code_cell("%%ranch\nscale = 3\ndef f(x):\n    return x * scale"),
        new_code_cell("%%ranch --ranks 1\nscale = 100"),
        new_code_cell("%%ranch --ranks=0,1\nbias = 1"),
    ])
    path = tmp_path / "live.ipynb"
    nbformat.write(nb, str(path))
    src = render_source(slice_notebook(load_notebook(path), "f"))
    namespace: dict = {}
    exec(compile(src, "slice", "exec"), namespace)
    assert namespace["f"](2) == 6 and "scale = 100" not in src
