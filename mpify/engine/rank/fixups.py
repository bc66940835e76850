"""Fix a module right after it is imported, or at once when it already was.

Why this exists: a few libraries decide once, when they are imported, from the process they find
themselves in ("is there an IPython shell?", "is this session interactive?"), and keep the answer
in module globals that other modules copy with `from X import name`. A rank must get the answer
a process started by torchrun gets (plain.py), and rank 0 must get it for the length of a launch
(frameworks.py), whether the library was imported before the launch, in the forkserver, or first
inside the user's function. So each fix is applied:

- now, when the module is already in sys.modules;
- else right after the module's own code has run, before any importer copies a name out of it:
  a finder at the head of sys.meta_path hands the import to the real finders and wraps the
  loader they return. Nothing is imported here; a module never imported is never touched.

A fix is a plain function of the module, applied at most once per import of it.
"""
from __future__ import annotations

import importlib.abc
import sys
import threading
from types import ModuleType
from typing import Callable

Fix = Callable[[ModuleType], None]

_lock = threading.Lock()
_pending: dict[str, list[Fix]] = {}  # module name -> fixes to apply when it is imported


class _FixingLoader(importlib.abc.Loader):
    """The real loader, then the module's fixes."""

    def __init__(self, loader, name: str):
        self._loader = loader
        self._name = name

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        with _lock:
            fixes = _pending.pop(self._name, [])
        for fix in fixes:
            fix(module)

    def __getattr__(self, name: str):  # get_source, is_package...: the real loader's
        return getattr(self._loader, name)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name not in _pending:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _FixingLoader(spec.loader, name)
                return spec
        return None


_finder = _Finder()


def after_import(name: str, fix: Fix) -> None:
    """Apply `fix` to module `name`: now if it is imported, else as soon as it is."""
    module = sys.modules.get(name)
    if module is not None:
        fix(module)
        return
    with _lock:
        _pending.setdefault(name, []).append(fix)
        if _finder not in sys.meta_path:
            sys.meta_path.insert(0, _finder)


def forget(name: str, fix: Fix) -> None:
    """Withdraw a fix not applied yet (its module was not imported meanwhile)."""
    with _lock:
        fixes = _pending.get(name, [])
        if fix in fixes:
            fixes.remove(fix)
        if not fixes:
            _pending.pop(name, None)
        if not _pending and _finder in sys.meta_path:
            sys.meta_path.remove(_finder)
