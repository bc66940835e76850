"""The payload and the script text: line map, header, cell comments, translations and refusals,
options from the signature, and the exported scripts of the samples passing py_compile and pyflakes.
No process is started here (the runs are in test_cli_run.py / test_cli_export.py)."""
from __future__ import annotations

import ast
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from export_helpers import SAMPLES
from mpify.analysis import slice_notebook
from mpify.analysis.magics import translate_cell
from mpify.export import ExportError, TargetArgsError, UntranslatableError, render_payload, render_script
from mpify.export.signature import build_parser, target_params
from mpify.export.tracebacks import rewrite_traceback


def write_nb(tmp_path, *cells, name="nb.ipynb"):
    nb = new_notebook(cells=[new_markdown_cell(c[3:]) if c.startswith("md:") else new_code_cell(c)
                             for c in cells])
    p = tmp_path / name
    nbformat.write(nb, str(p))
    return p


def test_line_map_points_at_the_same_text(tmp_path):
    p = write_nb(tmp_path, "md:# title", "import math\n\n\n# scale it\nK = 2\nunused = 1\n\nJ = 3",
                 "%matplotlib inline\n# the target\n@staticmethod\ndef f(x):\n    return math.sqrt(x) * K * J")
    sl = slice_notebook(p, "f")
    pl = render_payload(sl)
    lines = pl.text.split("\n")
    cells = nbformat.read(str(p), as_version=4).cells
    for n, (cell, ln) in pl.line_map.items():
        assert lines[n - 1] == translate_cell(cells[cell - 1].source).text.split("\n")[ln - 1]
    # comments kept, decorators kept, magics gone, cells named, header names notebook and target
    assert "# scale it\nK = 2\n\nJ = 3" in pl.text
    assert "# the target\n@staticmethod\ndef f(x):" in pl.text
    assert "%matplotlib" not in pl.text and "unused" not in pl.text
    assert "# ---- cell 2 ----" in pl.text and "# ---- cell 3 ----" in pl.text
    assert pl.text.startswith(f'"""`f` from {p}, exported by mpify.')
    assert "Cells used: 2, 3" in pl.text
    assert pl.line_map[lines.index("def f(x):") + 1] == (3, 4)


def test_future_import_goes_first(tmp_path):
    p = write_nb(tmp_path, "x = 1", "from __future__ import annotations\ndef f(a: 'int') -> int:\n    return a + x")
    text = render_payload(slice_notebook(p, "f")).text
    compile(text, "payload.py", "exec")
    assert text.index("from __future__") < text.index("x = 1")


def test_shell_capture_is_translated_and_said(tmp_path):
    p = write_nb(tmp_path, "files = !ls {where}", "def f():\n    return files")
    with pytest.raises(Exception):  # `where` is defined nowhere: the analyzer says so
        slice_notebook(p, "f")
    p = write_nb(tmp_path, "where = '.'\nfiles = !ls {where}", "def f():\n    return files")
    pl = render_payload(slice_notebook(p, "f"))
    assert "files = __import__('subprocess').getoutput(f'ls {where}').splitlines()" in pl.text
    assert "# mpify: line 2: `!ls {where}` translated to subprocess" in pl.text
    assert pl.notes and pl.notes[0].startswith("cell 1, line 2: ")


@pytest.mark.parametrize("src, what", [
    ("t = %timeit -o sum(range(9))", "`%timeit -o sum(range(9))` cannot be translated"),
    ("%run helper.py", "`%run helper.py` may define names"),
])
def test_untranslatable_lines_are_refused_naming_cell_and_line(tmp_path, src, what):
    p = write_nb(tmp_path, "md:# x", "import os\n" + src, "def f():\n    return t")
    with pytest.raises(UntranslatableError) as ei:
        render_payload(slice_notebook(p, "f"))
    msg = str(ei.value)
    assert "\n" not in msg and f"cell 2, line 2: {what}" in msg and (ei.value.cell, ei.value.lineno) == (2, 2)


def test_options_from_the_signature(tmp_path):
    p = write_nb(tmp_path, "from pathlib import Path\nLR = 0.1",
                 "def f(name: str, epochs=3, lr=LR, fast: bool = False, sizes: list = (1, 2), *,\n"
                 "      out: Path | None = None, batch_size: 'int' = 8, **extra):\n"
                 "    \"\"\"Train it.\n\n    More.\"\"\"\n    return locals()")
    sl = slice_notebook(p, "f")
    params = target_params(sl)
    assert [(q.name, q.kind, q.required) for q in params] == [
        ("name", "str", True), ("epochs", "int", False), ("lr", "literal", False),
        ("fast", "bool", False), ("sizes", "literal", False), ("out", "path", False),
        ("batch_size", "int", False)]
    parser = build_parser(params, "prog", target="f")
    got = vars(parser.parse_args(["--name", "a", "--no-fast", "--sizes", "[3, 4]", "--batch-size", "5",
                                  "--out", "o.pt", "--lr", "0.5"]))
    assert got == {"name": "a", "fast": False, "sizes": [3, 4], "batch_size": 5,
                   "out": __import__("pathlib").Path("o.pt"), "lr": 0.5}
    # Left-out options are not passed: the function's own defaults (even `LR`) apply.
    assert vars(parser.parse_args(["--name", "b", "--batch_size", "2"])) == {"name": "b", "batch_size": 2}
    with pytest.raises(TargetArgsError, match=r"^bad arguments for `f` \(after --\): the following "
                                              r"arguments are required: --name"):
        parser.parse_args([])
    with pytest.raises(TargetArgsError, match="invalid int value: 'x'"):
        parser.parse_args(["--name", "a", "--epochs", "x"])
    helptext = parser.format_help()
    assert "--epochs EPOCHS" in helptext and "(default: LR)" in helptext and "--fast, --no-fast" in helptext


def test_list_and_optional_options(tmp_path):
    p = write_nb(tmp_path, "from typing import List, Optional, Sequence\nfrom pathlib import Path",
                 "def f(sizes: list[int], tags: List[str] = (), scales: 'tuple[float, ...]' = (1.0,),\n"
                 "      limit: Optional[int] = 3, out: Path | None = None, pair: tuple[int, str] = (1, 'a'),\n"
                 "      flags: Sequence[bool] = (), maybe: Optional[List[int]] = None):\n    return locals()")
    params = target_params(slice_notebook(p, "f"))
    assert [(q.name, q.kind, q.many, q.optional) for q in params] == [
        ("sizes", "int", "list", False), ("tags", "str", "list", False), ("scales", "float", "tuple", False),
        ("limit", "int", "", True), ("out", "path", "", True), ("pair", "literal", "", False),
        ("flags", "literal", "", False), ("maybe", "int", "list", True)]
    parser = build_parser(params, "prog", target="f")
    got = vars(parser.parse_args(["--sizes", "3", "4", "--tags", "a", "b", "--scales", "0.5", "--limit", "None",
                                  "--out", "None", "--pair", "(2, 'b')"]))
    assert got == {"sizes": [3, 4], "tags": ["a", "b"], "scales": (0.5,), "limit": None, "out": None,
                   "pair": (2, "b")}
    assert vars(parser.parse_args(["--sizes", "1", "--maybe", "None"])) == {"sizes": [1], "maybe": None}
    assert vars(parser.parse_args(["--sizes", "1", "--maybe", "2", "3"])) == {"sizes": [1], "maybe": [2, 3]}
    with pytest.raises(TargetArgsError, match="None cannot be one of several values"):
        parser.parse_args(["--sizes", "1", "--maybe", "2", "None"])
    got = vars(parser.parse_args(["--sizes", "1", "--limit", "7", "--out", "o.pt", "--tags"]))
    assert got == {"sizes": [1], "limit": 7, "out": __import__("pathlib").Path("o.pt"), "tags": []}
    with pytest.raises(TargetArgsError, match="invalid int value: 'x'"):
        parser.parse_args(["--sizes", "1", "--limit", "x"])
    with pytest.raises(TargetArgsError, match="expected at least one argument"):
        parser.parse_args(["--sizes"])


def test_positional_only_parameters_are_a_user_error(tmp_path):
    p = write_nb(tmp_path, "def f(a, /, b=1):\n    return a")
    with pytest.raises(ExportError, match="positional-only parameters"):
        target_params(slice_notebook(p, "f"))


def test_script_main_avoids_the_notebooks_names(tmp_path):
    p = write_nb(tmp_path, "def main():\n    return 1", "def result(x: int = 2):\n    return main() + x")
    text = render_script(slice_notebook(p, "result")).text
    assert "def _main():" in text and "    _main()" in text
    assert "result = globals()['result'](**kwargs)" in text
    ns = {"__name__": "not_main"}
    exec(compile(text, "s.py", "exec"), ns)  # defines, runs nothing
    assert ns["result"](3) == 4


def test_rewrite_traceback_maps_payload_frames_and_drops_mpify_frames():
    import mpify.engine.rank.child as child
    text = ('Traceback (most recent call last):\n'
            f'  File "{child.__file__}", line 70, in run_rank\n    return fn(*args, **kwargs)\n'
            '           ^^^^^^^^^^^^^^^^^^^\n'
            '  File "/tmp/x/payload.py", line 40, in train\n    raise ValueError("no")\n'
            '  File "/tmp/x/payload.py", line 99, in main\n    train()\n'
            'ValueError: no\n')
    out = rewrite_traceback(text, "/tmp/x/payload.py", {40: (5, 8)}, "nb.ipynb")
    assert out == ('Traceback (most recent call last):\n'
                   '  File "nb.ipynb", cell 5, line 8, in train\n    raise ValueError("no")\n'
                   '  File "/tmp/x/payload.py", line 99, in main\n    train()\n'
                   'ValueError: no\n')


@pytest.mark.parametrize("nb, fn, ddp", [("ddp_train.ipynb", "train", True),
                                         ("hello_ranks.ipynb", "greet", False),
                                         ("hello_ranks.ipynb", "rank_sum", True),
                                         ("dataloader_workers.ipynb", "loader_sum", False)])
def test_sample_scripts_compile_and_pass_pyflakes(tmp_path, nb, fn, ddp):
    sl = slice_notebook(SAMPLES / nb, fn)
    text = render_script(sl, ddp=ddp, script="out.py").text
    # The script stands alone: it imports no mpify (the word itself may appear, in the notebook's
    # path in its docstring, as in a clone whose folder is named mpify).
    imported = {alias.name.partition(".")[0] for node in ast.walk(ast.parse(text))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert "mpify" not in imported
    out = tmp_path / "out.py"
    out.write_text(text)
    for cmd in ([sys.executable, "-m", "py_compile", str(out)], [sys.executable, "-m", "pyflakes", str(out)]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
