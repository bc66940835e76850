"""How rank processes are started: a warm forkserver (spawn on Windows).

fork is fast but breaks once the caller has touched CUDA ("Cannot re-initialize CUDA in forked
subprocess"); spawn is safe but re-imports torch in every rank, every launch (seconds). A
forkserver is a fresh interpreter that imports the heavy modules once and never touches CUDA,
then forks a rank per request: fork speed with spawn's safety.

Only heavy modules that the caller has already imported are preloaded, so a launch of a
torch-free function from a torch-free process stays light. When that set changes (the notebook
imported torch after the first launch) or an environment variable read at import time changes,
the forkserver is restarted once, on the next launch.
"""
from __future__ import annotations

import os
import sys
import threading

import multiprocess as mp

# Modules worth importing once in the forkserver when the caller uses them: importing them in
# each rank is what makes spawn slow. Order matters: numpy before torch, as torch imports it.
HEAVY_MODULES = ("numpy", "torch")
# Always preloaded: what every rank runs before the user's function.
BASE_MODULES = ("dill", "tblib", "mpify.engine.child")
# Variables read once when those modules are imported (thread pools, library paths).
_IMPORT_TIME_ENV_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "LD_", "PYTHON", "TORCH_", "KMP_")

_lock = threading.Lock()
_signature: tuple | None = None


def _wanted_signature() -> tuple:
    heavy = tuple(m for m in HEAVY_MODULES if m in sys.modules)
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_IMPORT_TIME_ENV_PREFIXES)))
    # sys.path is not part of it: the ranks get the caller's sys.path with every launch.
    return heavy, env


def context() -> mp.context.BaseContext:
    """The multiprocess context to start ranks with, its forkserver (re)started as needed."""
    if sys.platform == "win32":
        return mp.get_context("spawn")
    global _signature
    ctx = mp.get_context("forkserver")
    from multiprocess import forkserver

    with _lock:
        wanted = _wanted_signature()
        if wanted != _signature:
            # The running forkserver (if any) preloaded other modules or saw other settings.
            forkserver._forkserver._stop()
            forkserver.set_forkserver_preload(list(BASE_MODULES) + list(wanted[0]))
            _signature = wanted
        forkserver.ensure_running()
    return ctx


def shutdown() -> None:
    """Stop the warm forkserver; the next launch starts a new one."""
    global _signature
    if sys.platform == "win32":
        return
    from multiprocess import forkserver

    with _lock:
        forkserver._forkserver._stop()
        _signature = None
