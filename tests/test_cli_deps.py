"""`mpify deps`: the report, --json, --cell, and one-line errors with exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

# While `deps` is the app's only command, typer runs it as the root command (no sub-command
# name). Once the app has a callback or a second command (run/export), `python -m mpify deps`
# is the real thing; until then the runner gives the same app a no-op callback.
_RUNNER = """
import sys
from mpify.cli.app import app
from mpify.cli import commands  # noqa: F401
if len(app.registered_commands) == 1 and not app.registered_callback and not app.info.callback:
    app.callback()(lambda: None)
app(prog_name="mpify")
"""


def mpify(*args):
    return subprocess.run([sys.executable, "-c", _RUNNER, *map(str, args)], capture_output=True,
                          text=True, timeout=60)


@pytest.fixture
def nbpath(tmp_path):
    nb = new_notebook(cells=[
        new_markdown_cell("# demo"),
        new_code_cell("import math\n%matplotlib inline"),
        new_code_cell("SCALE = 2\nunused = 0"),
        new_code_cell("# the target\ndef train(x=1):\n    return math.sqrt(x) * SCALE"),
        new_code_cell("ranch(2, train)\nSCALE = 3"),
    ])
    p = tmp_path / "demo.ipynb"
    nbformat.write(nb, str(p))
    return p


def test_report(nbpath):
    r = mpify("deps", nbpath, "--fn", "train")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    # The notebook launches `train` in cell 5 and then rebinds SCALE: the slice is the state the
    # launch ran in (issue 16), SCALE = 2.
    assert out.startswith(f"train (function) in {nbpath}, as of cell 5, line 1, where the notebook runs it: "
                          "ranch(2, train)\n")
    assert "cell 2, line 1: import math" in out
    assert "cell 4, lines 2-3: def train(x=1): ..." in out
    assert "cell 3, line 1: SCALE = 2" in out and "SCALE = 3" not in out
    assert "defines `SCALE`, needed by `train`" in out
    assert "unused" not in out and "ranch(2" not in out.split("\n", 1)[1]


def test_json(nbpath):
    r = mpify("deps", nbpath, "--fn", "train", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["target"] == "train" and d["cells_used"] == [2, 3, 4]
    assert d["run_at"] == {"cell": 5, "lineno": 1, "source": "ranch(2, train)"} and d["upto_cell"] is None
    assert [(i["cell"], i["lineno"]) for i in d["items"]] == [(2, 1), (3, 1), (4, 2)]
    assert d["items"][2]["source"].startswith("# the target\ndef train")


def test_cell_option(nbpath):
    r = mpify("deps", nbpath, "--fn", "train", "--cell", "4", "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert [(i["cell"], i["lineno"]) for i in d["items"]] == [(2, 1), (3, 1), (4, 2)]
    # --cell K is the end of cell K, even after the launch: SCALE = 3 there.
    d = json.loads(mpify("deps", nbpath, "--fn", "train", "--cell", "5", "--json").stdout)
    assert [(i["cell"], i["lineno"]) for i in d["items"]] == [(2, 1), (4, 2), (5, 2)] and d["run_at"] is None


@pytest.mark.parametrize("args, match", [
    (["--fn", "trian"], "did you mean `train`?"),
    (["--fn", "train", "--cell", "42"], "out of range"),
    (["--fn", "train", "--cell", "3"], "after cell 3"),
])
def test_user_errors_one_line_exit_2(nbpath, args, match):
    r = mpify("deps", nbpath, *args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mpify: error: ") and match in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_and_bad_files(tmp_path):
    r = mpify("deps", tmp_path / "nope.ipynb", "--fn", "f")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "no such file" in r.stderr
    bad = tmp_path / "bad.ipynb"
    bad.write_text("{not json")
    r = mpify("deps", bad, "--fn", "f")
    assert r.returncode == 2 and "is not JSON" in r.stderr and r.stderr.strip().count("\n") == 0


def test_unresolved_name_is_a_user_error(tmp_path):
    nb = new_notebook(cells=[new_code_cell("def f():\n    return missing_name")])
    p = tmp_path / "u.ipynb"
    nbformat.write(nb, str(p))
    r = mpify("deps", p, "--fn", "f")
    assert r.returncode == 2
    assert "`missing_name` is used by `f` (cell 1, line 2)" in r.stderr


def test_python_dash_m_mpify_has_deps(nbpath):
    """The real entry point: `python -m mpify ... deps` (root command while it is the only one)."""
    from mpify.cli.app import app
    from mpify.cli import commands  # noqa: F401

    single = (len(app.registered_commands) == 1 and not app.registered_callback
              and not app.info.callback)
    args = [sys.executable, "-m", "mpify"] + ([] if single else ["deps"]) + [str(nbpath), "--fn", "train"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "train (function)" in r.stdout


def test_star_import_names_listed_once(tmp_path):
    """A star import's supplied names are one list on its reason line, not a line per name; a
    per-name import shows the names kept (issue 11)."""
    (tmp_path / "helpers.py").write_text("import math\nimport torch\nfrom torch import nn\n\n"
                                         "def scale(x):\n    return 2 * x\n")
    nb = new_notebook(cells=[
        new_code_cell("from helpers import *\nimport os, sys, json"),
        new_code_cell("probe = torch.stack([torch.ones(2), torch.zeros(2)]).norm()\nprobe"),
        new_code_cell("def f(n=2):\n    return scale(math.sqrt(n)), nn.Linear(n, 1).out_features, json.dumps(n)"),
    ])
    p = tmp_path / "course.ipynb"
    nbformat.write(nb, str(p))
    r = mpify("deps", p, "--fn", "f")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert out[1] == "3 statement(s) from cell(s) 1, 3"
    assert out[3:7] == [
        "cell 1, line 1: from helpers import *",
        "    - star import supplies `math`, `nn`, `scale`, needed by `f`",
        "cell 1, line 2: import json",
        "    - defines `json`, needed by `f`",
    ]
    assert "probe" not in r.stdout and "warnings" not in r.stdout
