"""How rank processes are started: a warm forkserver (spawn on Windows).

fork is fast but breaks once the caller has touched CUDA ("Cannot re-initialize CUDA in forked
subprocess"); spawn is safe but re-imports torch in every rank, every launch (seconds). A
forkserver is a fresh interpreter that imports the heavy modules once and never touches CUDA,
then forks a rank per request: fork speed with spawn's safety.

Only modules that the caller has already imported are preloaded, so a launch of a torch-free
function from a torch-free process stays light: numpy and torch; when the caller has torch, what
DDP's first construction imports (torch._dynamo, ~1.5 s per rank otherwise); and the other
installed packages the caller imported (pandas, transformers, fastai...), each checked in the
forkserver for threads and CUDA (engine/warm.py); one that fails the check is left out, and
MPIFY_DEBUG says so. When that set changes (the notebook imported torch after the first launch)
or an environment variable read at import time changes, the forkserver is restarted once, on
the next launch.
"""
from __future__ import annotations

import io
import json
import os
import sys
import tempfile
import threading
import time

import multiprocess as mp

from mpify.engine.debug import debug
from mpify.engine.env import held, patched_environ
from mpify.engine.groups import IMPORT_EARLY
from mpify.engine.rendezvous import AGENT_ENV_NAMES

# Modules worth importing once in the forkserver when the caller uses them: importing them in
# each rank is what makes spawn slow. Order matters: numpy before torch, as torch imports it.
HEAVY_MODULES = ("numpy", "torch")
# Always preloaded: what every rank runs before the user's function.
BASE_MODULES = ("dill", "mpify.engine.child")
# When the caller has torch: what DDP's first construction imports, and the module whose import
# during a launch would pin its process group (engine/groups.py). Checked like any extra.
TORCH_EXTRAS = ("torch._dynamo", "torch.nn.parallel.distributed") + IMPORT_EARLY
# Packages a notebook kernel or a test runner imports for itself, never for the ranks: preloading
# them is pure cost, and some start threads (zmq, tornado, debugpy).
_NOT_FOR_RANKS = frozenset("""
    IPython ipykernel ipywidgets jupyter_client jupyter_core comm debugpy zmq tornado traitlets
    jedi parso prompt_toolkit pygments pexpect ptyprocess decorator matplotlib_inline nest_asyncio
    platformdirs asttokens executing stack_data pure_eval wcwidth pickleshare backcall
    widgetsnbextension nbclient nbformat fastjsonschema jsonschema jsonschema_specifications
    referencing rpds attr attrs pytest _pytest pluggy iniconfig pytest_timeout pytest_benchmark
    py_spy pip setuptools pkg_resources _distutils_hack wheel typer click rich shellingham
    multiprocess dill mpify psutil
""".split())
# A package is worth a forkserver restart when it brought at least this many modules: a small
# one (typing_extensions, six) imports in a rank in milliseconds, and a kernel imports such
# helpers lazily (on a completion, a display), which would otherwise restart the forkserver.
_WORTH_PRELOADING = 10
# Variables read once when those modules are imported (thread pools, library paths).
_IMPORT_TIME_ENV_PREFIXES = ("OMP_", "MKL_", "OPENBLAS_", "LD_", "PYTHON", "TORCH_", "KMP_")
# How long the first launch waits for the forkserver's preloading verdict (the ranks would wait
# for the preloading anyway: the forkserver forks only once it is done).
_PRELOAD_WAIT = 600.0

_lock = threading.Lock()
_signature: tuple | None = None
_refused: set[str] = set()  # modules that failed the check once: never preloaded again
_present: set[str] = set()  # top-level modules the running forkserver holds (engine/warm.py's verdict)
_packages_seen: tuple[int, tuple] = (-1, ())


def _installed_packages() -> tuple:
    """Top-level installed packages (under a site-packages folder) that the caller imported,
    less the kernel's and test runner's own, and less the small ones (see _WORTH_PRELOADING).
    Recomputed only when sys.modules grew."""
    global _packages_seen
    count = len(sys.modules)
    if _packages_seen[0] == count:
        return _packages_seen[1]
    roots = tuple(p for p in sys.path if p.rstrip(os.sep).endswith(("site-packages", "dist-packages")))
    sizes: dict[str, int] = {}
    for name in list(sys.modules):
        top = name.partition(".")[0]
        sizes[top] = sizes.get(top, 0) + 1
    names = []
    for name, module in list(sys.modules.items()):
        if ("." in name or name.startswith("_") or name in _NOT_FOR_RANKS or name in HEAVY_MODULES
                or sizes.get(name, 0) < _WORTH_PRELOADING):
            continue
        path = getattr(module, "__file__", None)
        if path and path.startswith(roots):
            names.append(name)
    _packages_seen = (count, tuple(sorted(names)))
    return _packages_seen[1]


def _wanted_signature() -> tuple:
    heavy = tuple(m for m in HEAVY_MODULES if m in sys.modules)
    extras = (TORCH_EXTRAS if "torch" in heavy else ()) + _installed_packages()
    extras = tuple(m for m in extras if m not in _refused)
    # The rendezvous variables mpify itself sets are read at init, not at import: a live world
    # keeps them in the caller's environment, and a launch beside it must not restart anything.
    env = tuple(sorted((k, v) for k, v in os.environ.items()
                       if k.startswith(_IMPORT_TIME_ENV_PREFIXES) and k not in AGENT_ENV_NAMES
                       and held.get(k) != v))
    # sys.path is not part of it: the ranks get the caller's sys.path with every launch.
    return heavy, extras, env


if sys.platform != "win32":
    from multiprocess import forkserver as _fs
    from multiprocess import popen_forkserver, reduction, spawn, util
    from multiprocess.context import ForkServerProcess, set_spawning_popen

    class RankPopen(popen_forkserver.Popen):
        """popen_forkserver.Popen, minus the two keys that make the child import `__main__`.

        multiprocess, like multiprocessing, re-imports the parent's main script in every child so
        that functions defined there can be found by name. mpify ships fn by value (dill), so that
        is pure cost, and worse: a script that calls ranch without an `if __name__ == "__main__"`
        guard would launch again from every rank."""

        def _launch(self, process_obj):
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
            self.sentinel, w = _fs.connect_to_new_process(self._fds)
            _parent_w = os.dup(w)  # the child's view of its parent's liveness, as upstream
            self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = _fs.read_signed(self.sentinel)

    class RankProcess(ForkServerProcess):
        # At module level, not made in a function: the process object is pickled to the
        # forkserver, and dill pickles a class it cannot import by name by value, together with
        # the modules it references; under `pip install --target` those include multiprocess's
        # own, which hold a thread-local that cannot be pickled.
        @staticmethod
        def _Popen(process_obj):
            return RankPopen(process_obj)


def process_class():
    """The Process class to start ranks with, its forkserver (re)started as needed."""
    if sys.platform == "win32":
        return mp.get_context("spawn").Process
    context()
    return RankProcess


def context() -> mp.context.BaseContext:
    """The multiprocess context to start ranks with, its forkserver (re)started as needed."""
    if sys.platform == "win32":
        return mp.get_context("spawn")
    global _signature
    ctx = mp.get_context("forkserver")
    from multiprocess import forkserver

    with _lock:
        wanted = _wanted_signature()
        if _outdated(wanted):
            # The running forkserver (if any) preloaded other modules or saw other settings.
            _start(wanted)
            _signature = wanted
        forkserver.ensure_running()
    return ctx


def _outdated(wanted: tuple) -> bool:
    """Whether the running forkserver lacks a module the caller now has, or saw other settings.
    A package the forkserver already holds as another's dependency needs no restart."""
    if _signature is None:
        return True
    heavy, extras, env = wanted
    if (heavy, env) != (_signature[0], _signature[2]):
        return True
    return not set(extras) <= _present | set(_signature[1]) | _refused


def _start(wanted: tuple) -> None:
    """(Re)start the forkserver with `wanted`'s modules; leave out any extra that fails the check."""
    from multiprocess import forkserver

    heavy, extras, _ = wanted
    while True:
        forkserver._forkserver._stop()
        _present.clear()
        forkserver.set_forkserver_preload(list(BASE_MODULES) + list(heavy) + ["mpify.engine.warm"])
        verdict = _start_checked(list(extras))
        if verdict is not None:
            _present.update(verdict.get("present", ()))
        if verdict is None or not verdict.get("refused"):
            debug("forkserver preloaded", heavy, verdict and verdict["loaded"],
                  "; could not import", verdict and verdict["missing"])
            return
        refused = verdict["refused"]
        debug(f"not preloading {refused}: {verdict['why']} in the forkserver; ranks import it themselves")
        _refused.add(refused)
        extras = tuple(m for m in extras if m != refused)


def _start_checked(extras: list[str]) -> dict | None:
    """Start the forkserver with `extras` for engine/warm.py to import, and wait for its verdict
    (None if the forkserver went away first, or took too long)."""
    from multiprocess import forkserver

    from mpify.engine import warm

    fd, report = tempfile.mkstemp(prefix="mpify-preload-", suffix=".json")
    os.close(fd)
    os.unlink(report)
    with patched_environ({warm.LIST_ENV: json.dumps(extras), warm.REPORT_ENV: report,
                          warm.PATH_ENV: json.dumps(sys.path)}):
        forkserver.ensure_running()  # the forkserver inherits os.environ as of now
    pid = forkserver._forkserver._forkserver_pid
    deadline = time.monotonic() + _PRELOAD_WAIT
    try:
        while not os.path.exists(report):
            if time.monotonic() > deadline or not _alive(pid):
                return None
            time.sleep(0.005)
        with open(report) as f:
            return json.load(f)
    finally:
        for path in (report, report + ".part"):
            try:
                os.unlink(path)
            except OSError:
                pass


def _alive(pid: int | None) -> bool:
    """Whether the forkserver still runs, without reaping it (multiprocess reaps it on stop)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True


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
