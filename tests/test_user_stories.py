"""What a PyTorch user in a hurry runs into, each a story that once went wrong. Real processes: the
installed `mpify` console script in its own session (nothing may be left behind)."""
from __future__ import annotations

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from export_helpers import mpify



def _write_nb(path, *cells):
    nb = new_notebook()
    nb.cells = [new_code_cell(c) for c in cells]
    nbformat.write(nb, str(path))
    return path


def _project(tmp_path):
    """project/nb.ipynb that imports project/nb_sidekick.py and reads project/data.txt, as in Jupyter
    (whose kernel runs in the notebook's directory); a decoy data.txt where the user stands."""
    proj = tmp_path / "project"
    proj.mkdir()
    (proj / "nb_sidekick.py").write_text("TAG = 'from nb_sidekick.py'\n")
    (proj / "data.txt").write_text("next to the notebook\n")
    _write_nb(proj / "nb.ipynb",
              "import os\nimport nb_sidekick",
              "def load():\n"
              "    with open('data.txt') as f:\n"
              "        text = f.read().strip()\n"
              "    print('rank', os.environ['RANK'], 'read', text, flush=True)\n"
              "    return text, nb_sidekick.TAG")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "data.txt").write_text("the wrong file\n")
    return proj, elsewhere


def test_run_a_notebook_from_another_directory_sees_its_files_and_modules(tmp_path, tmpdir_, no_strays):
    # Was: ModuleNotFoundError for `import nb_sidekick` (even from the notebook's own directory: the
    # console script's sys.path[0] is its bin/), and from elsewhere `open('data.txt')` silently
    # read the file of the directory the user stood in.
    proj, elsewhere = _project(tmp_path)
    for cwd, nb in ((elsewhere, proj / "nb.ipynb"), (proj, "nb.ipynb"), (tmp_path, "project/nb.ipynb")):
        r = mpify("run", nb, "--fn", "load", "-n", "2", tmpdir=tmpdir_, cwd=cwd)
        assert r.returncode == 0, r.stderr
        lines = r.stdout.splitlines()
        assert lines[-1] == repr(("next to the notebook", "from nb_sidekick.py"))
        assert "[rank 1] rank 1 read next to the notebook" in lines


def test_run_notebook_from_python_puts_cwd_and_sys_path_back(tmp_path, no_strays):
    from mpify import run_notebook

    proj, elsewhere = _project(tmp_path)
    before_cwd, before_path = os.getcwd(), list(sys.path)
    os.chdir(elsewhere)
    try:
        assert run_notebook(proj / "nb.ipynb", "load", 1) == ("next to the notebook", "from nb_sidekick.py")
        assert os.getcwd() == str(elsewhere)
    finally:
        os.chdir(before_cwd)
        sys.modules.pop("nb_sidekick", None)
    assert sys.path == before_path


def test_timeout_and_dead_rank_are_one_line_not_mpifys_own_traceback(tmp_path, tmpdir_, no_strays):
    # Was: a Python traceback through mpify/export/runner.py and mpify/engine/launch.py.
    nb = _write_nb(tmp_path / "nb.ipynb",
                   "import os, time\n"
                   "def nap():\n    time.sleep(60)\n"
                   "def die():\n"
                   "    if os.environ['RANK'] == '1':\n        os._exit(3)\n"
                   "    time.sleep(60)")
    r = mpify("run", nb, "--fn", "nap", "-n", "2", "--timeout", "1", tmpdir=tmpdir_)
    assert r.returncode == 1
    assert r.stderr == "LaunchTimeoutError: the launch ran past its timeout of 1.0 s; every rank was stopped\n"
    r = mpify("run", nb, "--fn", "die", "-n", "2", tmpdir=tmpdir_)
    assert r.returncode == 1
    assert r.stderr == "RankDiedError: rank 1 died without raising an exception: exit code 3\n"
