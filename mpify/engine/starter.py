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

import io
import os
import sys
import threading

import multiprocess as mp

# Modules worth importing once in the forkserver when the caller uses them: importing them in
# each rank is what makes spawn slow. Order matters: numpy before torch, as torch imports it.
HEAVY_MODULES = ("numpy", "torch")
# Always preloaded: what every rank runs before the user's function.
BASE_MODULES = ("dill", "mpify.engine.child")
# Variables read once when those modules are imported (thread pools, library paths).
_IMPORT_TIME_ENV_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "LD_", "PYTHON", "TORCH_", "KMP_")

_lock = threading.Lock()
_signature: tuple | None = None


def _wanted_signature() -> tuple:
    heavy = tuple(m for m in HEAVY_MODULES if m in sys.modules)
    env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith(_IMPORT_TIME_ENV_PREFIXES)))
    # sys.path is not part of it: the ranks get the caller's sys.path with every launch.
    return heavy, env


def _rank_process_class(ctx):
    """A Process whose child skips re-running the caller's `__main__`.

    multiprocess, like multiprocessing, re-imports the parent's main script in every child so
    that functions defined there can be found by name. mpify ships fn by value (dill), so that
    is pure cost, and worse: a script that calls ranch without an `if __name__ == "__main__"`
    guard would launch again from every rank."""
    from multiprocess import forkserver, popen_forkserver, reduction, spawn, util
    from multiprocess.context import set_spawning_popen

    class RankPopen(popen_forkserver.Popen):
        def _launch(self, process_obj):
            # popen_forkserver.Popen._launch, minus the two keys that make the child import main
            prep_data = spawn.get_preparation_data(process_obj._name)
            prep_data.pop("init_main_from_name", None)
            prep_data.pop("init_main_from_path", None)
            buf = io.BytesIO()
            set_spawning_popen(self)
            try:
                reduction.dump(prep_data, buf)
                reduction.dump(process_obj, buf)
            finally:
                set_spawning_popen(None)
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)
            _parent_w = os.dup(w)  # the child's view of its parent's liveness, as upstream
            self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = forkserver.read_signed(self.sentinel)

    class RankProcess(ctx.Process):
        @staticmethod
        def _Popen(process_obj):
            return RankPopen(process_obj)

    return RankProcess


_process_class = None


def process_class():
    """The Process class to start ranks with, its forkserver (re)started as needed."""
    global _process_class
    if sys.platform == "win32":
        return mp.get_context("spawn").Process
    context()
    if _process_class is None:
        _process_class = _rank_process_class(mp.get_context("forkserver"))
    return _process_class


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


def _forget_inherited_forkserver() -> None:
    """In a child forked from a caller: start its own forkserver when it launches.

    The parent's forkserver is not this process's child (waitpid on it fails, so multiprocess
    would raise ChildProcessError) and its socket belongs to the parent. Its alive pipe is closed
    here so that it still stops when the parent goes."""
    global _signature, _lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    _signature = None
    module = sys.modules.get("multiprocess.forkserver")
    server = getattr(module, "_forkserver", None)
    if server is None or server._forkserver_pid is None:
        return
    alive = server._forkserver_alive_fd
    server._forkserver_alive_fd = server._forkserver_pid = server._forkserver_address = None
    server._lock = threading.Lock()
    try:
        os.close(alive)
    except (OSError, TypeError):
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_forkserver)
