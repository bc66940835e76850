"""Pickling what travels to the ranks, by value, with a useful message when something can't.

Functions, lambdas and classes defined in notebook cells live in `__main__`, which a rank cannot
import, so dill pickles them by value with the globals they use (recurse=True). Everything is
pickled once in the caller, before any process starts, so an unpicklable object fails fast and
is named: which argument, or which global of the function.
"""
from __future__ import annotations

import importlib
import io
import sys
import types
from typing import Any, Callable

import dill

from mpify.engine.args import shm
from mpify.engine.errors import ResultError, ShipError

# recurse=True: capture only the globals a function really uses, by value, so a notebook's
# unrelated unpicklable objects (open files, kernels' widgets) don't sink the launch.
_DUMPS_KW = dict(recurse=True, byref=False)


def importable_by_name(module: types.ModuleType) -> bool:
    """Can a rank get this very module with `import <its name>`? Its name maps to it in
    sys.modules and it came from an import (a spec), not from `types.ModuleType(...)`. The ranks
    have the caller's sys.path and working directory, so wherever its file lives they find it."""
    name = getattr(module, "__name__", None)
    return (isinstance(name, str) and name != "__main__" and sys.modules.get(name) is module
            and getattr(module, "__spec__", None) is not None)


_save_module_by_value = dill.Pickler.dispatch[types.ModuleType]


def _save_module(pickler: Any, module: types.ModuleType) -> None:
    # dill pickles by value (its whole namespace) every module whose file is not under a
    # site-packages folder: a notebook's helpers.py beside it (a lock or a thread-local in it
    # cannot be pickled), and every module of a `pip install --target DIR` on PYTHONPATH. A
    # module the ranks can import travels as its name; only the others go by value.
    if importable_by_name(module):
        pickler.save_reduce(importlib.import_module, (module.__name__,), obj=module)
    else:
        _save_module_by_value(pickler, module)


def _shell_class() -> type | None:
    """IPython's InteractiveShell where IPython is imported (looked up, never imported)."""
    return getattr(sys.modules.get("IPython.core.interactiveshell"), "InteractiveShell", None)


class _Pickler(dill.Pickler):
    dispatch = type(dill.Pickler.dispatch)(dill.Pickler.dispatch)
    dispatch[types.ModuleType] = _save_module

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._shell = _shell_class()

    def reducer_override(self, obj: Any) -> Any:
        # A cell's function that names `get_ipython` (in a kernel, the shell's bound method in the
        # user's namespace) or holds the shell would carry the kernel's shell along, which cannot
        # be pickled (its history's sqlite connection). A rank has no shell, as a process torchrun
        # starts (engine/rank/plain.py): it gets IPython's own `get_ipython`, which returns None there,
        # and None for the shell itself.
        shell = self._shell
        if shell is None:
            return NotImplemented
        if isinstance(obj, shell):
            return type(None), ()
        if isinstance(obj, types.MethodType) and isinstance(obj.__self__, shell) and obj.__name__ == "get_ipython":
            return getattr, (importlib.import_module("IPython.core.getipython"), "get_ipython")
        return NotImplemented


def dumps(obj: Any, persistent_id: Callable[[Any], Any] | None = None) -> bytes:
    """dill's dumps, modules by name; `persistent_id` lets large buffers go by reference (see shm.py)."""
    buf = io.BytesIO()
    pickler = _Pickler(buf, **_DUMPS_KW)
    if persistent_id is not None:
        pickler.persistent_id = persistent_id
    pickler.dump(obj)
    return buf.getvalue()


def loads(data: bytes) -> Any:
    unpickler = dill.Unpickler(io.BytesIO(data))
    unpickler.persistent_load = shm.persistent_load
    return unpickler.load()


def _fails(obj: Any) -> Exception | None:
    try:
        dumps(obj)
    except Exception as exc:  # any pickling failure: TypeError, PicklingError, AttributeError...
        return exc
    return None


def _describe(obj: Any) -> str:
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None)
    return f"`{name}`" if name else f"a {type(obj).__name__}"


def _culprit_in_function(fn: Callable) -> str:
    """Name the global or closure variable of `fn` that cannot be pickled, if one can be found."""
    code = getattr(fn, "__code__", None)
    glb = getattr(fn, "__globals__", {})
    if code is not None:
        for name in code.co_names:
            if name in glb and _fails(glb[name]) is not None:
                return f"; its global `{name}` ({type(glb[name]).__name__}) cannot be pickled"
        for name, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
            try:
                value = cell.cell_contents
            except ValueError:  # an empty cell: nothing to pickle
                continue
            if _fails(value) is not None:
                return f"; the variable `{name}` it closes over ({type(value).__name__}) cannot be pickled"
    return ""


def dumps_launch(fn: Callable, args: tuple, kwargs: dict, extra: dict, writer: shm.ShmWriter) -> bytes:
    """Pickle the whole launch once, large arrays into shared memory through `writer`; on
    failure raise ShipError naming the object at fault."""
    try:
        blob = dumps((fn, args, kwargs, extra), writer.persistent_id)
        writer.finish()
        return blob
    except OSError as exc:  # from shm: no memory, or a full /dev/shm
        raise ShipError(f"a large argument could not be put in shared memory for the ranks: {exc}") from exc
    except Exception:  # find out which part is at fault below
        pass
    err = _fails(fn)
    if err is not None:
        raise ShipError(f"the function {_describe(fn)} cannot be pickled for the ranks: {err}"
                        f"{_culprit_in_function(fn)}") from err
    for i, arg in enumerate(args):
        err = _fails(arg)
        if err is not None:
            raise ShipError(f"positional argument {i} ({_describe(arg)}) cannot be pickled for the ranks: {err}") from err
    for key, arg in kwargs.items():
        err = _fails(arg)
        if err is not None:
            raise ShipError(f"keyword argument `{key}` ({_describe(arg)}) cannot be pickled for the ranks: {err}") from err
    for key, arg in extra.items():
        err = _fails(arg)
        if err is not None:
            raise ShipError(f"`{key}` ({_describe(arg)}) cannot be pickled for the ranks: {err}") from err
    err = _fails((fn, args, kwargs, extra))
    raise ShipError(f"the launch cannot be pickled for the ranks: {err}") from err


def dumps_result(rank: int, value: Any) -> bytes:
    """Pickle a rank's return value, or raise ResultError naming the rank and the type."""
    try:
        return dumps(value)
    except Exception as exc:
        raise ResultError(f"rank {rank} returned a {type(value).__module__}.{type(value).__qualname__} "
                          f"that cannot be pickled back to the caller: {exc}") from None
