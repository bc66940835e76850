"""mpify: run a Python function on N ranked processes, the notebook kernel being rank 0.

    from mpify import ranch, import_star, TorchDDPCtx, torchddp_launch, World
    %load_ext mpify     # in a notebook: %mpify start 4 --ddp, then %%ranch cells

This module is the whole public surface.

Why the names load on first use (PEP 562 `__getattr__`) rather than at `import mpify`: every
`mpify.analysis` or `mpify.cli` import runs this file first, and `mpify deps` or `mpify export`
never start a process, yet importing the engine (multiprocess, dill, the launch machinery) cost
them 0.1 s of a 0.3 s `mpify --help`. The first public name asked for loads them all at once, as
the eager import did, with the modules that register torch's parts with the engine (the store
host and the shared-memory tensor codec, `_REGISTRARS`), whichever name a user imports first. A
rank that meets a tensor kind it has not registered imports its module itself (engine/args/shm.py).

In an interactive session (a Jupyter kernel, IPython, `python -i`) importing mpify also starts the
forkservers the first launch will fork its ranks from, in a thread, so that a notebook's first
launch finds them ready (engine/start/pool.py's `prewarm`). MPIFY_PREWARM=0 turns that off,
MPIFY_PREWARM=1 turns it on in any process.
"""
from __future__ import annotations

import importlib
import os
import sys
import threading
from typing import TYPE_CHECKING

__version__ = "0.3.0"

# name -> the module that defines it
_WHERE = {
    "LaunchBusyError": "mpify.engine.errors", "LaunchTimeoutError": "mpify.engine.errors",
    "MpifyError": "mpify.engine.errors", "RankDiedError": "mpify.engine.errors",
    "RankRaisedError": "mpify.engine.errors", "RemoteTraceback": "mpify.engine.errors",
    "ResultError": "mpify.engine.errors", "ShipError": "mpify.engine.errors",
    "ranch": "mpify.engine.launch.ranch", "shutdown": "mpify.engine.launch.ranch",
    "PortInUseError": "mpify.engine.rendezvous",
    "World": "mpify.engine.world.world", "WorldClosedError": "mpify.engine.errors",
    "ExportError": "mpify.export", "run_notebook": "mpify.export",
    "import_star": "mpify.imports",
    "TorchDDPCtx": "mpify.torchddp.ctx", "in_torchddp": "mpify.torchddp.ctx", "torchddp_launch": "mpify.torchddp.ctx",
}

__all__ = [
    "ranch", "import_star", "TorchDDPCtx", "torchddp_launch", "in_torchddp", "shutdown",
    "MpifyError", "RankRaisedError", "RankDiedError", "LaunchTimeoutError", "LaunchBusyError", "ShipError",
    "ResultError", "RemoteTraceback", "PortInUseError", "run_notebook", "ExportError", "World",
    "WorldClosedError", "load_ipython_extension",
]


# The same names for readers of the source rather than of the running module: type checkers, and
# the docs' API reference (mkdocstrings reads this file without importing it). Never executed;
# tests/test_docs_blocks.py checks that it names exactly what `_WHERE` does.
if TYPE_CHECKING:
    from mpify.engine.errors import (LaunchBusyError, LaunchTimeoutError, MpifyError, RankDiedError,
                                     RankRaisedError, RemoteTraceback, ResultError, ShipError,
                                     WorldClosedError)
    from mpify.engine.launch.ranch import ranch, shutdown
    from mpify.engine.rendezvous import PortInUseError
    from mpify.engine.world.world import World
    from mpify.export.errors import ExportError
    from mpify.export.runner import run_notebook
    from mpify.imports import import_star
    from mpify.torchddp.ctx import TorchDDPCtx, in_torchddp, torchddp_launch


# Imported with the public names for what they register with the engine; neither imports torch
# until used.
_REGISTRARS = ("mpify.torchddp.codec", "mpify.torchddp.store")


def load_ipython_extension(ipython) -> None:
    """`%load_ext mpify`: the `%mpify` line magic and the `%%ranch` cell magic (a live world)."""
    from mpify.extension import load

    load(ipython)


def unload_ipython_extension(ipython) -> None:
    from mpify.extension import unload

    unload(ipython)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'mpify' has no attribute {name!r}")
    for module in _REGISTRARS:
        importlib.import_module(module)
    for module in dict.fromkeys(_WHERE.values()):  # all of them: see the docstring
        mod = importlib.import_module(module)
        for n, m in _WHERE.items():
            if m == module:
                globals()[n] = getattr(mod, n)
    return globals()[name]


def __dir__():
    return sorted(set(globals()) | set(__all__))


def _interactive() -> bool:
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return (get is not None and get() is not None) or hasattr(sys, "ps1")


def _prewarm() -> None:
    from mpify.engine.start import pool

    pool.prewarm()


def _maybe_prewarm() -> None:
    flag = os.environ.get("MPIFY_PREWARM", "")
    # Never in a forkserver (it imports mpify to preload the rank's code, with MPIFY_PRELOAD set)
    # nor in a rank: only the process that launches starts forkservers.
    if flag == "0" or "MPIFY_PRELOAD" in os.environ or (flag != "1" and not _interactive()):
        return
    threading.Thread(target=_prewarm, name="mpify-prewarm", daemon=True).start()


_maybe_prewarm()
