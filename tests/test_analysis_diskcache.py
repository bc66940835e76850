"""The analyzer's disk cache (mpify/analysis/diskcache.py): what a star import supplies and which
notebooks nbformat accepted, kept between runs in the user's cache directory, keyed by each file's
path, size and mtime, and never trusted.

Each check runs in a fresh interpreter (the cache is per process, then on disk) with
MPIFY_CACHE_DIR set to a directory of the test's own: a warm run reads the cache, a corrupt file
or a stale or malformed entry is ignored and replaced, `MPIFY_CACHE_DIR=off` writes nothing, and
a notebook read from the cache keeps nbformat's schema warning and is re-read once edited.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

HELPER = ("import math\nfrom collections import *\n\n__all__ = ['scale', 'math', 'Counter']\n\n\n"
          "def scale(x):\n    return 2 * x\n")

RESOLVE = """
import json, sys
from mpify.analysis.stars import resolve_star
e = resolve_star("course_helpers", search_dir=sys.argv[1])
print(json.dumps({"names": sorted(e.names), "complete": e.complete}))
"""


def _resolve(tmp_path, cache):
    env = dict(os.environ, MPIFY_CACHE_DIR=str(cache))
    r = subprocess.run([sys.executable, "-c", RESOLVE, str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _helper(tmp_path):
    path = tmp_path / "course_helpers.py"
    path.write_text(HELPER)
    return path


def _entries(cache):
    return json.loads((cache / "stars-v1.json").read_text())


def test_a_warm_run_reads_the_entry_written_by_the_first(tmp_path):
    helper, cache = _helper(tmp_path), tmp_path / "cache"
    first = _resolve(tmp_path, cache)
    assert first["names"] == ["Counter", "math", "scale"] and first["complete"]
    entry = _entries(cache)[str(helper)]
    st = os.stat(helper)
    assert entry[:2] == [st.st_size, st.st_mtime_ns]
    assert entry[2][0] == {"math": "module", "scale": "object"}  # its own bindings; `*` resolved each run
    # The entry is what the next run uses: make it say more than the file (same size and mtime),
    # and a run that trusted it would list the extra name. (It is checked for shape, not content:
    # a cache keyed by size and mtime cannot tell an edit that kept both.)
    data = _entries(cache)
    data[str(helper)][2][1] = ["scale", "math", "Counter", "from_the_cache"]
    (cache / "stars-v1.json").write_text(json.dumps(data))
    assert "from_the_cache" in _resolve(tmp_path, cache)["names"]


def test_a_stale_entry_is_ignored_and_replaced(tmp_path):
    helper, cache = _helper(tmp_path), tmp_path / "cache"
    _resolve(tmp_path, cache)
    data = _entries(cache)
    data[str(helper)][2][1] = ["stale_name"]  # what an older version of the file said...
    data[str(helper)][1] -= 10**9  # ...one second before the file's mtime
    (cache / "stars-v1.json").write_text(json.dumps(data))
    assert _resolve(tmp_path, cache)["names"] == ["Counter", "math", "scale"]
    st = os.stat(helper)
    assert _entries(cache)[str(helper)][:2] == [st.st_size, st.st_mtime_ns]

    helper.write_text(HELPER.replace("'Counter']", "'Counter', 'shift']") + "\n\ndef shift(x):\n    return x\n")
    assert _resolve(tmp_path, cache)["names"] == ["Counter", "math", "scale", "shift"]  # the edit is seen


def test_a_corrupt_file_or_entry_is_ignored_and_rewritten(tmp_path):
    helper, cache = _helper(tmp_path), tmp_path / "cache"
    cache.mkdir()
    (cache / "stars-v1.json").write_text('{"truncated": [1, 2')  # a write cut short by a crash
    assert _resolve(tmp_path, cache)["names"] == ["Counter", "math", "scale"]
    assert str(helper) in _entries(cache)  # valid JSON again, with the entry
    for bad in ([{"math": "function"}, None, False, False, []],  # a kind that does not exist
                [{"math": "module"}, None, "no", False, []],  # a flag that is not a bool
                ["not", "five", "fields"], "unreadable-ish", None):
        data = _entries(cache)
        data[str(helper)][2] = bad
        (cache / "stars-v1.json").write_text(json.dumps(data))
        assert _resolve(tmp_path, cache)["names"] == ["Counter", "math", "scale"], bad
    assert not [n for n in os.listdir(cache) if n.endswith(".tmp")]  # no temp file left by the writes


def test_off_writes_nothing(tmp_path):
    _helper(tmp_path)
    home = tmp_path / "home"
    env = dict(os.environ, MPIFY_CACHE_DIR="off", HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"))
    r = subprocess.run([sys.executable, "-c", RESOLVE, str(tmp_path)], capture_output=True, text=True,
                       env=env, timeout=60)
    assert r.returncode == 0 and json.loads(r.stdout)["names"] == ["Counter", "math", "scale"]
    assert not home.exists()


LOAD = """
import json, sys
from mpify.analysis import load_notebook
nb = load_notebook(sys.argv[1])
print(json.dumps({"cells": [[c.kind, c.source, c.execution_count, c.raised] for c in nb.cells],
                  "warnings": nb.warnings, "nbformat": "nbformat" in sys.modules}))
"""


def _load(path, cache):
    r = subprocess.run([sys.executable, "-c", LOAD, str(path)], capture_output=True, text=True,
                       env=dict(os.environ, MPIFY_CACHE_DIR=str(cache)), timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_a_notebook_read_before_is_read_without_nbformat_and_keeps_its_warning(tmp_path):
    nb = new_notebook(cells=[new_code_cell("x = 1", execution_count=1), new_code_cell("print(x)", execution_count=2)])
    nb.cells[1].outputs = [{"output_type": "stream", "name": "stdout", "text": "1\n", "metadata": {}}]
    nb.cells[0].outputs = [{"output_type": "error", "ename": "E", "evalue": "", "traceback": []}]
    path = tmp_path / "nb.ipynb"
    path.write_text(json.dumps(nb))  # a stream output with `metadata`: outside the schema
    cache = tmp_path / "cache"
    first, second = _load(path, cache), _load(path, cache)
    assert first["nbformat"] and not second["nbformat"]
    assert first["cells"] == second["cells"] == [["code", "x = 1", 1, True], ["code", "print(x)", 2, False]]
    assert len(first["warnings"]) == 1 and "does not follow the notebook schema" in first["warnings"][0]
    assert second["warnings"] == first["warnings"]

    nbformat.write(new_notebook(cells=[new_code_cell("y = 2")]), str(path))  # edited: read again
    third = _load(path, cache)
    assert third["nbformat"] and third["cells"] == [["code", "y = 2", None, False]] and third["warnings"] == []
