"""What a star import supplies, read from the module's source (mpify/analysis/stars.py), on a
course-style package written beside the notebook: nested and relative star imports, `__all__`,
private names, a cycle, and the cases where the list cannot be complete."""
from __future__ import annotations

import nbformat
from nbformat.v4 import new_code_cell, new_notebook

from mpify.analysis import slice_notebook
from mpify.analysis.stars import resolve_star


def _package(tmp_path):
    pkg = tmp_path / "coursepkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from .core import *\nfrom .data import *\n")
    (pkg / "core.py").write_text(
        "import torch\nfrom torch import nn\n\n__all__ = ['Learner', 'torch', 'nn']\n\n"
        "class Learner:\n    pass\n\n\ndef _helper():\n    pass\n")
    # data.py star-imports its own package back (a cycle) and has no __all__.
    (pkg / "data.py").write_text(
        "import math as m\ntry:\n    import numpy as np\nexcept ImportError:\n    np = None\n"
        "from coursepkg import *\n\n\ndef load(n=3):\n    return list(range(n))\n\n_private = 1\n")
    (pkg / "lazy.py").write_text("def __getattr__(name):\n    raise AttributeError(name)\n\nVISIBLE = 1\n")
    (pkg / "looped.py").write_text("__all__ = ['a']\nfor _n in ['b', 'c']:\n    __all__.append(_n)\na = b = c = 1\n")
    return pkg


def test_nested_relative_star_imports_and_all(tmp_path):
    _package(tmp_path)
    e = resolve_star("coursepkg", search_dir=str(tmp_path))
    assert e.found and e.complete
    assert e.names == {"Learner": "object", "torch": "module", "nn": "object", "m": "module",
                       "np": "object", "load": "object"}  # `np = None` is a binding too
    assert "_helper" not in e.names and "_private" not in e.names


def test_incomplete_when_names_can_come_from_elsewhere(tmp_path):
    _package(tmp_path)
    lazy = resolve_star("coursepkg.lazy", search_dir=str(tmp_path))
    assert lazy.found and not lazy.complete and "VISIBLE" in lazy.names  # module __getattr__
    looped = resolve_star("coursepkg.looped", search_dir=str(tmp_path))
    assert looped.found and not looped.complete and looped.names == {"a": "object"}
    missing = resolve_star("not_installed_anywhere.vision.all", search_dir=str(tmp_path))
    assert not missing.found and missing.names == {}
    assert resolve_star("", level=1, search_dir=str(tmp_path)).found is False  # notebook-level `from . import *`


def test_cache_sees_an_edited_module(tmp_path):
    _package(tmp_path)
    assert "extra" not in resolve_star("coursepkg.core", search_dir=str(tmp_path)).names
    core = tmp_path / "coursepkg" / "core.py"
    core.write_text(core.read_text().replace("'nn']", "'nn', 'extra']") + "\nextra = 2\n")
    import os
    st = os.stat(core)
    os.utime(core, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a later mtime, as an edit gives
    assert "extra" in resolve_star("coursepkg.core", search_dir=str(tmp_path)).names


def test_slice_keeps_the_star_import_that_supplies_a_name(tmp_path):
    _package(tmp_path)
    nb = new_notebook(cells=[
        new_code_cell("from coursepkg.data import *"),
        new_code_cell("from coursepkg.core import *"),
        new_code_cell("x = torch.ones(2).sum()"),
        new_code_cell("def f(n=2):\n    return load(n), Learner.__name__, tensor_like"),
    ])
    p = tmp_path / "nb.ipynb"
    nbformat.write(nb, str(p))
    sl = slice_notebook(p, "f")
    # `load` comes from the first, `Learner` from the second; `tensor_like` from neither, although
    # both lists are complete: both are kept for it rather than refusing (a static read can miss
    # a name set through sys.modules), and the reasons say "may supply".
    assert [i.source.strip() for i in sl.items] == ["from coursepkg.data import *", "from coursepkg.core import *",
                                                    "def f(n=2):\n    return load(n), Learner.__name__, tensor_like"]
    assert sl.items[0].reasons[0].startswith("star import may supply `load`, `tensor_like`, needed by `f`")
    assert sl.items[1].reasons[0].startswith("star import may supply `Learner`, `tensor_like`, needed by `f`")
    assert not [w for w in sl.warnings if "no Python source" in w]
