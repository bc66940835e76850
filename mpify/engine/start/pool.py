"""Which warm forkserver forks a launch's ranks, and when one starts (spawn on Windows).

fork is fast but breaks once the caller has touched CUDA ("Cannot re-initialize CUDA in forked
subprocess"); spawn is safe but re-imports torch in every rank, every launch (seconds). A
forkserver is a fresh interpreter that imports the heavy modules once and never touches CUDA,
then forks a rank per request: fork speed with spawn's safety.

What a forkserver preloads follows the caller: numpy and torch when the caller has them; when it
has torch, what DDP's first construction imports (torch._dynamo, ~1.5 s per rank otherwise); and
the other installed packages the caller imported (pandas, transformers, fastai...), each checked
in the forkserver for threads and CUDA (warm.py); one that fails the check is left out,
and MPIFY_DEBUG says so. A torch-free caller's ranks stay light.

No launch waits for a preload it can do without. Each forkserver is a `Server`, and more than one
may exist at a time:
- a *quick* server preloads only the heavy modules (numpy, torch): it can fork in about 1.5 s;
- a *complete* server also preloads the extras (torch._dynamo and the caller's packages), about
  3 s more.
A launch is served by a complete server when one is ready; else by any ready server whose heavy
modules and import-time environment fit (its ranks import the missing extras themselves), while a
complete one starts in the background; a launch waits only when no ready server fits at all (the
first launch of a process, or the caller changed an import-time variable such as OMP_*), and then
only for a quick one. When a complete server takes over, the others retire: each stops once its
last rank (a live world's, say) has exited. In an interactive kernel a complete one starts at
`import mpify` (`prewarm`), so a notebook's launch a few seconds later finds one ready (one
before that forks the kernel: zygote.py); MPIFY_PREWARM=0 turns that off, MPIFY_PREWARM=1 turns it
on anywhere.

The servers themselves are forkserver.py's (`Server`: one forkserver process, its socket, and
how a rank is forked from the one chosen here); the caller forked as one, zygote.py's.
"""
from __future__ import annotations

import os
import sys
import time

import multiprocess as mp

from mpify.engine.debug import debug
from mpify.engine.env import held
from mpify.engine.rank.groups import IMPORT_EARLY
from mpify.engine.rendezvous import AGENT_ENV_NAMES
from mpify.engine.start import forkserver
from mpify.engine.start.zygote import _zygote_allowed

if sys.platform != "win32":
    from mpify.engine.start.forkserver import RankProcess, Server
    from mpify.engine.start.zygote import Zygote, _may_fork_caller

# Modules worth importing once in the forkserver when the caller uses them: importing them in
# each rank is what makes spawn slow. Order matters: numpy before torch, as torch imports it.
HEAVY_MODULES = ("numpy", "torch")
# When the caller has torch: what DDP's first construction imports, and the module whose import
# during a launch would pin its process group (rank/groups.py). Checked like any extra.
TORCH_EXTRAS = ("torch._dynamo", "torch.nn.parallel.distributed") + IMPORT_EARLY
# Packages a notebook kernel or a test runner imports for itself, never for the ranks: preloading
# them is pure cost, and some start threads (zmq, tornado, debugpy). Among them what those import
# after their start: ipykernel 7's anyio, jupyter_client's dateutil, debugpy's pydevd_plugins,
# pytest-xdist's execnet (each once restarted a test worker's complete forkserver: 5 s of CPU).
_NOT_FOR_RANKS = frozenset("""
    IPython ipykernel ipywidgets jupyter_client jupyter_core comm debugpy zmq tornado traitlets
    jedi parso prompt_toolkit pygments pexpect ptyprocess decorator matplotlib_inline nest_asyncio
    platformdirs asttokens executing stack_data pure_eval wcwidth pickleshare backcall
    widgetsnbextension nbclient nbformat fastjsonschema jsonschema jsonschema_specifications
    referencing rpds attr attrs pytest _pytest pluggy iniconfig pytest_timeout pytest_benchmark
    py_spy pip setuptools pkg_resources _distutils_hack wheel typer click rich shellingham
    multiprocess dill mpify psutil execnet xdist anyio dateutil pydevd_plugins
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


def heavy_imported() -> list[str]:
    """The heavy modules this process has imported: another node's process imports them too
    (slurm/node.py), so that its forkserver preloads them as this one's does."""
    return [m for m in HEAVY_MODULES if m in sys.modules]


def _wanted_signature(installed_heavy: bool = False) -> tuple:
    """(heavy modules, extras, import-time environment) for the caller as it is now.
    installed_heavy: count the heavy modules that are installed, not only those imported (prewarm:
    a notebook imports torch after mpify as often as before)."""
    if installed_heavy:
        from importlib.util import find_spec

        heavy = tuple(m for m in HEAVY_MODULES if m in sys.modules or find_spec(m) is not None)
    else:
        heavy = tuple(m for m in HEAVY_MODULES if m in sys.modules)
    extras = (TORCH_EXTRAS if "torch" in heavy else ()) + _installed_packages()
    extras = tuple(m for m in extras if m not in forkserver._refused)
    # The rendezvous variables mpify itself sets are read at init, not at import: a live world
    # keeps them in the caller's environment, and a launch beside it must not restart anything.
    env = tuple(sorted((k, v) for k, v in os.environ.items()
                       if k.startswith(_IMPORT_TIME_ENV_PREFIXES) and k not in AGENT_ENV_NAMES
                       and held.get(k) != v))
    # sys.path is not part of it: the ranks get the caller's sys.path with every launch.
    return heavy, extras, env


def context() -> mp.context.BaseContext:
    """The multiprocess context whose Pipes the ranks' ends are made with."""
    return mp.get_context("spawn" if sys.platform == "win32" else "forkserver")


def process_class():
    """The Process class to start this launch's ranks with, its forkserver chosen (see the
    module's docstring): complete and ready, else ready and fitting, else the first to be ready."""
    if sys.platform == "win32":
        return mp.get_context("spawn").Process
    with forkserver._lock:
        wanted = _wanted_signature()
        _poll()
        ready = [s for s in forkserver._servers if not s.retired and s.usable()]
        chosen = next((s for s in reversed(ready) if s.complete(wanted)), None)
        if chosen is None:
            chosen = next((s for s in reversed(ready) if s.fits(wanted)), None)
        if chosen is None and _may_fork_caller():
            try:
                chosen = _start(wanted, quick=True, zygote=True)
            except OSError as exc:  # no memory for a fork, say: wait for a forkserver instead
                debug("could not fork the caller:", repr(exc))
        if chosen is None:
            _ensure(wanted, quick=True)
            chosen = _first_ready(wanted)
        # The others retire, but for a complete one still starting while a quick one serves.
        keep_starting = not chosen.complete(wanted)
        for s in list(forkserver._servers):
            if s is chosen or s.retired or (keep_starting and not s.ready() and s.complete(wanted)):
                continue
            s.retire(kill=not s.ready())  # one still starting has no rank: stop it now
        forkserver._serving = chosen
        debug("ranks fork from forkserver", chosen.proc.pid, "(complete)" if chosen.complete(wanted) else
              "(not complete: the ranks import what it lacks themselves)")
    return RankProcess


def single_launch() -> None:
    """Say that this process makes one launch and then exits (`mpify run`): its catch_up then
    starts no forkserver for launches to come. One would start importing torch (and the rest)
    beside the ranks for nobody, until the command's exit stopped it. Bound to this pid: a rank
    forked from the caller (the zygote's) that launches in turn is not bound by it."""
    global _single_launch_pid
    _single_launch_pid = os.getpid()


_single_launch_pid: int | None = None


def catch_up() -> None:
    """Once a launch has its ranks: start a complete forkserver in the background if none is
    ready or starting, so the next launches find one (the caller may have imported a package
    during the launch, or this one was served by a quick one). Never waits, never raises: a
    failure to start one is not this launch's, and the next launch meets it if it persists.

    A zygote retires here: it holds the caller's memory as it was at the fork, which the caller
    may since have freed or replaced (a script's next data set), so it lives no longer than the
    launch it served (or, for a world, than the world's ranks). The next launch forks a new one
    if it needs one."""
    if sys.platform == "win32":
        return
    try:
        with forkserver._lock:
            for s in forkserver._servers:  # first: a failure to start a server below must not keep it alive
                if isinstance(s, Zygote) and not s.retired:
                    s.retire()
            if _single_launch_pid == os.getpid():
                return
            _poll()
            _ensure(_wanted_signature(), quick=False)
    except Exception as exc:
        debug("could not start a forkserver in the background:", repr(exc))


def prewarm() -> None:
    """Start a complete forkserver now, for the launches to come (no waiting). A quick one too
    only where the caller is never forked (MPIFY_ZYGOTE=0, not Linux): elsewhere a launch before
    the complete one is ready forks the caller, in 0.4 s where a quick server needs 2.5 s of torch
    import first; one that cannot be forked then (a thread of the user's, CUDA) waits for the
    complete one."""
    if sys.platform == "win32":
        return
    with forkserver._lock:
        wanted = _wanted_signature(installed_heavy=True)
        _poll()
        if not _zygote_allowed():
            _ensure(wanted, quick=True)
        _ensure(wanted, quick=False)


def _ensure(wanted: tuple, quick: bool) -> None:
    """Start a server of this kind for `wanted` unless a live one (ready or starting) already
    serves it: one that fits, for a quick one; one that is complete, for a complete one."""
    if not any(s.fits(wanted) if quick else s.complete(wanted) for s in forkserver._servers if not s.retired):
        _start(wanted, quick)


def _start(wanted: tuple, quick: bool, zygote: bool = False) -> "Server":
    server = (Zygote if zygote else Server)(wanted, quick)
    server.launch()
    forkserver._servers.append(server)
    return server


def _poll() -> None:
    """Read the verdicts that came in; a server that preloaded a refused module is replaced."""
    for s in list(forkserver._servers):
        if s.retired:
            continue
        if not s.alive():
            debug("forkserver", s.proc.pid, "is gone")
            s.retire()
        elif s.ready() and s.verdict.get("refused"):
            refused = s.verdict["refused"]
            debug(f"not preloading {refused}: {s.verdict['why']} in the forkserver; ranks import it themselves")
            forkserver._refused.add(refused)
            s.retire(kill=True)  # it holds the module it refused: never fork from it
            _start((s.signature[0], tuple(m for m in s.signature[1] if m != refused), s.signature[2]), quick=False)


def _first_ready(wanted: tuple) -> "Server":
    """Wait for the first fitting server to finish preloading (the ranks would wait for it anyway:
    a forkserver forks only once it is done)."""
    deadline = time.monotonic() + _PRELOAD_WAIT
    while True:
        _poll()
        fitting = [s for s in forkserver._servers if s.fits(wanted)]
        for s in fitting:
            if s.usable():
                return s
        if not fitting:  # every candidate died: start another (raises if it cannot start)
            _start(wanted, quick=True)
        if time.monotonic() > deadline:
            raise RuntimeError(f"mpify: no forkserver was ready after {_PRELOAD_WAIT:.0f} s")
        time.sleep(0.005)


def wait_complete(timeout: float = _PRELOAD_WAIT) -> int:
    """Wait until a complete forkserver is ready for the caller as it is now (starting one if
    none is on its way), so that the next launch's ranks hold every preload; its pid. For
    benchmarks of the warm launch and for tests: a launch itself never waits for one."""
    deadline = time.monotonic() + timeout
    while True:
        with forkserver._lock:
            wanted = _wanted_signature()
            _poll()
            for s in forkserver._servers:
                if not s.retired and s.complete(wanted) and s.usable():
                    return s.proc.pid
            _ensure(wanted, quick=False)
        if time.monotonic() > deadline:
            raise TimeoutError(f"mpify: no complete forkserver was ready after {timeout:.0f} s")
        time.sleep(0.01)


def server_pids() -> set[int]:
    """The forkservers of this process, starting, serving or retiring (for tests and tools)."""
    with forkserver._lock:
        return {s.proc.pid for s in forkserver._servers if s.proc is not None and s.proc.poll() is None}


def shutdown() -> None:
    """Stop the warm forkservers; the next launch starts a new one."""
    if sys.platform == "win32":
        return
    with forkserver._lock:
        servers = list(forkserver._servers)
    for s in servers:
        s.retire(kill=not s.ready())
    for s in servers:
        if s.proc is not None:
            s.proc.wait()
