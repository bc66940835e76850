"""Run one function of a notebook on N ranks: slice -> script text -> private module -> ranch.

Why a real module file: the ranks import the payload by name from a private temp dir, so the
functions and classes the notebook defines pickle *by reference* (a DataLoader's workers, a
returned object of a notebook class, the target itself), exactly as they would from a package.
The text imported is the one `mpify export` writes (payload + main(); main() is not called here).

The temp dir is made by mkdtemp (mode 0700, under $TMPDIR), the file is 0600, and both go in every
outcome: result, error, timeout, Ctrl-C. sys.path and sys.modules are put back as well.

The notebook runs as Jupyter runs it: in the notebook's own directory (a data file it opens by a
relative path is the one next to it) with that directory on sys.path (a module next to it imports).
The working directory is put back afterwards; the ranks inherit it, as they inherit the caller's.

This is what `mpify run` calls, and what a notebook cell calls to run another notebook's function:
`mpify.run_notebook("other.ipynb", "train", 2, ddp=True, kwargs={"epochs": 1})`.
"""
from __future__ import annotations

import functools
import importlib
import os
import re
import secrets
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from mpify.engine.errors import MpifyError, RemoteTraceback
from mpify.export.errors import ExportError
from mpify.export.payload import Payload
from mpify.export.prepare import Prepared, prepare
from mpify.export.replay import check_required
from mpify.export.signature import target_params
from mpify.export.tracebacks import attach_mapped_traceback, keep_source

__all__ = ["run_notebook", "prepare", "loaded_payload", "Prepared"]


def _module_name(notebook: str) -> str:
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(notebook))[0]) or "notebook"
    # Unique per run: two runs in one kernel (or its forkserver's ranks) never share a cached module.
    return f"mpify_payload_{stem}_{secrets.token_hex(4)}"


@contextmanager
def _in_notebook_dir(notebook: str) -> Iterator[None]:
    """cwd = the notebook's directory, which is also on sys.path (as in its Jupyter kernel)."""
    nb_dir = os.path.dirname(os.path.abspath(notebook))
    old_cwd = os.getcwd()
    added = nb_dir not in sys.path
    if added:
        sys.path.insert(0, nb_dir)
    os.chdir(nb_dir)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if added and nb_dir in sys.path:
            sys.path.remove(nb_dir)


@contextmanager
def loaded_payload(payload: Payload) -> Iterator[tuple[Any, str]]:
    """Write the payload to a private temp dir, import it, yield (module, file path); remove it all
    afterwards. An exception in the notebook's module-level code is re-raised with a mapped
    traceback (see tracebacks.py). Runs in the notebook's directory (see above)."""
    tmp = tempfile.mkdtemp(prefix="mpify-run-")
    name = _module_name(payload.notebook)
    path = os.path.join(tmp, name + ".py")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(payload.text)
        keep_source(path, payload.text)  # frames stay readable once the file is gone
        with _in_notebook_dir(payload.notebook):
            sys.path.insert(0, tmp)
            try:
                importlib.invalidate_caches()
                try:
                    module = importlib.import_module(name)  # runs the slice's top level in this process
                except KeyboardInterrupt:
                    raise
                except BaseException as exc:
                    attach_mapped_traceback(exc, path, payload.line_map, payload.notebook)
                    raise
                yield module, path
            finally:
                if tmp in sys.path:
                    sys.path.remove(tmp)
                sys.modules.pop(name, None)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_prepared(prep: Prepared, nprocs: int = 1, args: tuple = (), kwargs: dict | None = None,
                 **ranch_options: Any) -> Any:
    """Run a Prepared target on `nprocs` ranks with ranch; rank 0's value (or every local rank's
    with gather=True)."""
    import mpify.torchddp.store  # noqa: F401 (node 0 of a multi-node launch hosts torch's store: it registers the host)
    from mpify.engine.slurm import agents as slurm
    from mpify.engine.launch.ranch import ranch

    if prep.call is not None and (args or kwargs):
        raise ExportError(f"the call {prep.call.source!r} gives the arguments; no others can be added "
                          "(options after --, args=, kwargs=)")
    with loaded_payload(prep.payload) as (module, path):
        target = getattr(module, prep.slice.target)
        if not callable(target):
            raise ExportError(f"`{prep.slice.target}` in {prep.payload.notebook} is a "
                              f"{type(target).__name__}, not a function: nothing to run")
        ctx = ranch_options.pop("ctx", None)
        if prep.ddp:
            from mpify.torchddp.ctx import TorchDDPCtx, _ddp_ctx

            ctx = _ddp_ctx(ctx, TorchDDPCtx(backend=prep.backend))
        if prep.call is not None:  # the script's own function that makes the --call
            call = getattr(module, prep.payload.call_function)
        else:
            # partial: the target's own keywords can never collide with ranch's (timeout, gather...).
            call = functools.partial(target, *args, **(kwargs or {}))
        try:
            # A Slurm launch's other nodes have no such temp folder: the slice travels as text.
            with slurm.ship_modules({os.path.splitext(os.path.basename(path))[0]: (prep.payload.text, path)}):
                return ranch(nprocs, call, ctx=ctx, **ranch_options)
        except KeyboardInterrupt:
            raise
        except BaseException as exc:
            # mpify's own account of a launch (a timeout, a rank that died, a result that cannot
            # come back) has no frames of the user's: it keeps its one line.
            if not isinstance(exc, MpifyError) or isinstance(exc.__cause__, RemoteTraceback):
                attach_mapped_traceback(exc, path, prep.payload.line_map, prep.payload.notebook)
            raise


def run_notebook(path, fn: str | None = None, nprocs: int = 1, *, ddp: bool = False,
                 backend: str | None = None, cell: int | None = None, args: tuple = (),
                 kwargs: dict | None = None, call: str | None = None, faithful: bool = False,
                 **ranch_options: Any) -> Any:
    """Run function `fn` of notebook `path` on `nprocs` ranks and return rank 0's value.

    What runs is what `mpify export` would write: the statements `fn` needs (as of the end of cell
    `cell`, or of the notebook), imported from a private temp dir. `ddp=True` runs it under
    TorchDDPCtx (`backend` gloo/nccl, or chosen). `args`/`kwargs` go to fn; or `call` gives the
    whole call as a cell would write it, with the notebook's own objects as arguments
    (`call="train(model, 3)"`; `fn` may then be left out). `faithful=True`: the analyzer's
    conservative slice. Other keywords go to ranch (timeout, show_ranks, gather, nnodes,
    node_rank, master_addr, master_port, caller_rank).

    Raises AnalysisError or ExportError (user errors, one line; MissingArgumentsError names the
    notebook's own call of fn when required parameters are missing), or the rank's exception with
    a RemoteTraceback cause whose text names notebook cells (`File "nb.ipynb", cell 5, line 8`).
    """
    prep = prepare(path, fn, ddp=ddp, backend=backend, cell=cell, call=call, faithful=faithful)
    if call is None:
        check_required(prep.slice, target_params(prep.slice), set(kwargs or ()), len(args))
    return run_prepared(prep, nprocs, tuple(args), kwargs, **ranch_options)
