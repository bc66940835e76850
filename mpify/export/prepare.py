"""What a command asks for (`--fn` or `--call`, `--cell`) -> the slice, and the script text.

Why a module of its own: `mpify deps`, `mpify export` and `mpify run` all choose the slice the same
way, and only `run` starts processes. Kept apart from runner.py (which imports the engine), the
first two import nothing of the engine, torch, multiprocess or dill: they start in a fraction of
the time.

The point a slice is taken at: the end of cell K with `--cell K`; else, without `--call`, the
notebook's last run of the target (the slicer's default, `mpify.analysis.runpoint`); with a
`--call` and no `--cell`, the end of the notebook (the call may use what later cells make). A
replay mpify suggests carries `--cell K` of the call it replays (cli/run.py, cli/export.py).
"""
from __future__ import annotations

import os

from mpify.analysis import UnresolvedNameError, slice_notebook
from mpify.analysis.calls import CallExpressionError, CallSpec, parse_call
from mpify.export.errors import ExportError
from mpify.export.payload import Payload

__all__ = ["Prepared", "prepare", "slice_target"]


class Prepared:
    """A notebook function ready to run: its slice, the script text and the target's parameters."""

    def __init__(self, sl, payload: Payload, ddp: bool, backend: str | None, call=None):
        self.slice = sl
        self.payload = payload
        self.ddp = ddp
        self.backend = backend
        self.call = call  # the parsed --call (mpify.analysis.calls.CallSpec), or None
        self.warnings = list(dict.fromkeys(list(sl.warnings) + payload.notes))


def slice_target(path, fn: str | None, *, cell: int | None = None, call: str | None = None,
                 faithful: bool = False) -> tuple:
    """(the Slice, the parsed --call or None) for `--fn fn` or `--call call`, as of `--cell cell`.
    `call`: a call of the target as a cell would write it (`"train(model, 3)"`); the names it
    reads are sliced in too, `fn` may then be None. Raises AnalysisError / ExportError."""
    spec = None
    if call is not None:
        spec = parse_call(call)
        if fn is not None and fn != spec.target:
            raise ExportError(f"--fn {fn} and --call {spec.source!r} name different functions; "
                              "--fn may be left out with --call")
        fn = spec.target
    elif fn is None:
        raise ExportError("say which function: --fn NAME, or --call 'NAME(args...)'")
    try:
        sl = slice_notebook(os.fspath(path), fn, upto_cell=cell, extra_roots=spec.names if spec else (),
                            faithful=faithful, replay=spec.source if spec else None)
    except UnresolvedNameError as e:
        if spec is None or e.name not in spec.names or e.cell is not None:
            raise
        # The name is the --call's own (no cell reads it): say so rather than "used by the target".
        raise _undefined(spec, e.name, path, cell) from None
    if spec is not None:
        _check_call_names(sl, spec, cell)
    return sl, spec


def prepare(path, fn: str | None, *, ddp: bool = False, backend: str | None = None, cell: int | None = None,
            call: str | None = None, faithful: bool = False) -> Prepared:
    """Slice `fn` out of notebook `path` (see slice_target) and render it as the script's text.
    `faithful`: the analyzer's conservative reading (every call on a used module, every draw).
    Raises AnalysisError / ExportError."""
    from mpify.export.script import render_script

    if backend is not None and not ddp:
        raise ExportError("--backend needs --ddp (without DDP there is no process group)")
    if backend not in (None, "gloo", "nccl"):
        raise ExportError(f"--backend must be gloo or nccl, not {backend!r}")
    sl, spec = slice_target(path, fn, cell=cell, call=call, faithful=faithful)
    payload = render_script(sl, ddp=ddp, backend=backend, script=f"{sl.target}_script.py", call=spec)
    return Prepared(sl, payload, ddp, backend, spec)


def _undefined(spec: CallSpec, name: str, path, cell) -> CallExpressionError:
    upto = f" before the end of cell {cell}" if cell else ""
    return CallExpressionError(f"--call {spec.source!r} uses `{name}`, which {path} does not define{upto}")


def _check_call_names(sl, spec: CallSpec, cell) -> None:
    """A --call name that nothing in the notebook defines is left to the star imports, which may
    supply anything (the slicer's rule). Where every one of them was read and lists what it
    supplies, and none lists the name, it is a typo in the command line: say so now rather than
    as a NameError in every rank."""
    from mpify.analysis.stars import resolve_star

    typed = [n for n in spec.names if n in sl.unresolved]
    if not typed:
        return
    search = os.path.dirname(os.path.abspath(sl.notebook.path))
    exports = [resolve_star(m, search_dir=search) for m in sl.star_imports]
    if not all(e.found and e.complete for e in exports):
        return
    for name in typed:
        if not any(name in e.names for e in exports):
            raise _undefined(spec, name, sl.notebook.path, cell)
