"""import_star: `from X import *` inside a function, where Python forbids the statement.

A function shipped to a rank by value has its own globals dict, so a star import written in a
notebook cell does not travel with it; calling `import_star(["fastai.vision.all"])` at the top of
the function puts the same names into that function's globals, in the rank where it runs.
"""
from __future__ import annotations

import importlib
import sys
from typing import Iterable


def public_names(module) -> list[str]:
    """What `from module import *` binds: `__all__`, else every name not starting with '_'."""
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in vars(module) if not n.startswith("_")]
    return list(names)


def import_star(modules: str | Iterable[str], into: dict | None = None) -> None:
    """Do `from M import *` for each module M into `into` (default: the calling function's
    globals). A missing module raises ImportError naming it."""
    if isinstance(modules, str):
        modules = [modules]
    target = sys._getframe(1).f_globals if into is None else into
    for name in modules:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ImportError(f"import_star: cannot import module {name!r}: {exc}", name=name) from exc
        for attr in public_names(module):
            target[attr] = getattr(module, attr)
