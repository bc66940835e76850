"""The CLI imports only what a command needs: `mpify --help`, `mpify deps` and `mpify export` start
no process, so they never import the engine, torch, multiprocess or dill (nor pydantic, which
typer would use to convert plain option values: mpify/cli/coercion.py). Checked in a fresh
interpreter per command, from `sys.modules` once the command has returned; the notebook
star-imports torch and calls it, which the analyzer reads as source, never importing it."""
from __future__ import annotations

import json
import subprocess
import sys

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

PROBE = """
import json, sys
sys.argv = ["mpify"] + json.loads(sys.argv[1])
from mpify.cli.app import main
try:
    main()
except SystemExit as e:
    code = e.code
print(json.dumps([code, sorted(sys.modules)]), file=sys.stderr)
"""

HEAVY = ("mpify.engine", "mpify.torchddp.ctx", "torch", "multiprocess", "dill", "pydantic")


def _notebook(tmp_path):
    cells = [new_code_cell("from torch.nn.functional import *\nimport torch"),
             new_code_cell("w = torch.ones(3)"),
             new_code_cell("def score(k: int = 2):\n    return relu(w * k).sum().item()")]
    path = tmp_path / "nb.ipynb"
    nbformat.write(new_notebook(cells=cells), str(path))
    return path


@pytest.mark.parametrize("args", [["--help"], ["deps", "{nb}", "--fn", "score"],
                                  ["export", "{nb}", "--fn", "score", "-o", "{out}"]])
def test_deps_export_and_help_import_nothing_of_the_engine(tmp_path, args):
    nb = _notebook(tmp_path)
    argv = [a.format(nb=nb, out=tmp_path / "score.py") for a in args]
    r = subprocess.run([sys.executable, "-c", PROBE, json.dumps(argv)], capture_output=True, text=True,
                       cwd=tmp_path, timeout=60)
    code, modules = json.loads(r.stderr.splitlines()[-1])
    assert code in (0, None), r.stderr
    loaded = [m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY)]
    assert loaded == []
    if args[0] == "export":
        assert "def score(k: int = 2):" in (tmp_path / "score.py").read_text()


def test_the_public_names_still_load_with_their_registrations():
    code = ("import sys, mpify\nassert 'mpify.engine' not in sys.modules\n"
            "from mpify import ranch, TorchDDPCtx\nimport mpify.engine.launch.ranch as l\n"
            "assert ranch is l.ranch and 'mpify.torchddp.ctx' in sys.modules\n"
            "assert sorted(n for n in mpify.__all__ if not hasattr(mpify, n)) == []\nprint('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr
