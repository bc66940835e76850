"""How rank processes are started: warm forkservers (spawn on Windows).

fork is fast but breaks once the caller has touched CUDA ("Cannot re-initialize CUDA in forked
subprocess"); spawn is safe but re-imports torch in every rank, every launch (seconds). A
forkserver is a fresh interpreter that imports the heavy modules once and never touches CUDA,
then forks a rank per request: fork speed with spawn's safety.

What a forkserver preloads follows the caller: numpy and torch when the caller has them; when it
has torch, what DDP's first construction imports (torch._dynamo, ~1.5 s per rank otherwise); and
the other installed packages the caller imported (pandas, transformers, fastai...), each checked
in the forkserver for threads and CUDA (engine/warm.py); one that fails the check is left out,
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
before that forks the kernel, below); MPIFY_PREWARM=0 turns that off, MPIFY_PREWARM=1 turns it
on anywhere.

A caller that would have to wait (its first launch, no server ready) and that can be forked
safely is forked instead: the *zygote* (Android's name for the same trick) is the caller itself,
ready at once with everything it has imported, serving that launch only (catch_up). Safe
means no Python thread but the caller's (a fork copies only the calling thread, and any lock
another thread held stays held forever in the child; native pools: see _may_fork_caller) and CUDA
untouched, which a script and `mpify run` usually are at their first launch; a Jupyter kernel's
own threads (zmq's, its output capture's) are allowed, so a notebook's launch right after `import
mpify`, before the forkservers it started are ready, is served by the kernel forked (see
_kernels_own). What the caller holds open (a pipe to a subprocess, a socket) the
zygote must not keep open: every fd but stdio and its own two is pointed at /dev/null, its number
kept so that no Python object of the caller's that still names it can ever close something else.
MPIFY_ZYGOTE=0 turns it off.

A caller that is killed (SIGKILL, the OOM killer) runs no exit handler, so the files its exit
would have removed stay: multiprocess's `pymp-*` folder (the forkservers' sockets are made in it)
and a forkserver's verdict it had not read. Each forkserver and zygote is told at its start which
of them are its caller's (its own socket and verdict, and the folder if the caller owns it:
_own_temp_dir), and removes them at its exit if the caller is gone by then (warm.remove_leftovers).
It exits once the caller and every rank have closed its alive pipe, and the ranks end themselves
when their caller dies (child.py's watchdog). It leads a process group of its own, so that it
outlives a kill of the caller's whole group too (Jupyter kills a kernel so; see Server.launch).
"""
from __future__ import annotations

import atexit
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
import warnings

import multiprocess as mp

from mpify.engine.debug import debug
from mpify.engine.env import held
from mpify.engine.rank.groups import IMPORT_EARLY
from mpify.engine.rendezvous import AGENT_ENV_NAMES

# Modules worth importing once in the forkserver when the caller uses them: importing them in
# each rank is what makes spawn slow. Order matters: numpy before torch, as torch imports it.
HEAVY_MODULES = ("numpy", "torch")
# Always preloaded: what every rank runs before the user's function.
BASE_MODULES = ("dill", "mpify.engine.rank.child")
# When the caller has torch: what DDP's first construction imports, and the module whose import
# during a launch would pin its process group (engine/rank/groups.py). Checked like any extra.
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

_lock = threading.Lock()
_servers: list["Server"] = []  # oldest first: starting, serving and retiring forkservers
_serving: "Server | None" = None  # the one the current launch forks its ranks from (RankPopen)
_reapers: set[threading.Thread] = set()  # threads waiting for a retired server to exit (retire)
# A reaper removes its server's socket from multiprocess's temp folder, which
# multiprocess's own exit handler removes whole: a file a reaper removes while that handler walks
# the folder made it fail, and print a traceback, at the exit of `mpify run` (seen
# once, on 3.10). At exit the reapers leave the sockets to it (_at_exit).
_files_lock = threading.Lock()
_exiting = False
# Listeners' sockets made outside multiprocess's temp folder (_listener): [socket, folder] lists
# whose removal no exit handler of multiprocess's does; _at_exit removes what is left of them.
_outside: list[list[str]] = []
_refused: set[str] = set()  # modules that failed the check once: never preloaded again
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
    (slurm_node.py), so that its forkserver preloads them as this one's does."""
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
    extras = tuple(m for m in extras if m not in _refused)
    # The rendezvous variables mpify itself sets are read at init, not at import: a live world
    # keeps them in the caller's environment, and a launch beside it must not restart anything.
    env = tuple(sorted((k, v) for k, v in os.environ.items()
                       if k.startswith(_IMPORT_TIME_ENV_PREFIXES) and k not in AGENT_ENV_NAMES
                       and held.get(k) != v))
    # sys.path is not part of it: the ranks get the caller's sys.path with every launch.
    return heavy, extras, env


if sys.platform != "win32":
    from multiprocess import connection, popen_forkserver, reduction, resource_tracker, spawn, util
    from multiprocess.context import ForkServerProcess, set_spawning_popen
    from multiprocess.forkserver import ForkServer, read_signed

    class Server(ForkServer):
        """One forkserver process, with what it preloads and whether it has finished preloading.

        multiprocess keeps one forkserver per process (its module global) and restarts it in
        place, so a launch would wait for every restart; mpify starts its own instances, each
        with its own socket and alive pipe, and chooses among them per launch (process_class)."""

        def __init__(self, signature: tuple, quick: bool):
            super().__init__()
            heavy, extras, env = signature
            self.signature = (heavy, () if quick else extras, env)
            self.quick = quick
            self.proc = None  # subprocess.Popen of the forkserver
            self.owned: list[str] = []  # its socket's file (and folder), removed once it exits
            self.verdict: dict | None = None  # engine/warm.py's, once its preloading is done
            self.present: set[str] = set()  # top-level modules it holds (the verdict's)
            self.started = time.monotonic()
            self.retired = False
            fd, self.report = tempfile.mkstemp(prefix="mpify-preload-", suffix=".json")
            os.close(fd)
            os.unlink(self.report)

        def launch(self) -> None:
            """Start the forkserver process. As multiprocess's ensure_running, except that the
            environment is passed to the new process rather than set in os.environ around it: a
            prewarm runs beside the user's code, which must not see mpify's variables come and go."""
            import subprocess

            from mpify.engine import warm

            heavy, extras, _ = self.signature
            resource_tracker.ensure_running()  # its fd goes to every rank (connect_to_new_process)
            preload = list(BASE_MODULES) + list(heavy) + ["mpify.engine.warm"]
            env = dict(os.environ, **{warm.LIST_ENV: json.dumps(list(extras)), warm.REPORT_ENV: self.report,
                                      warm.PATH_ENV: json.dumps(sys.path)})
            listener, address, owned = _listener()
            with listener:
                # Every rank holds the write end of "alive" too: the forkserver exits once the
                # caller and all its ranks have closed it. Then, if the caller is gone (killed: its
                # exit handlers never ran), it removes the caller's files (warm.remove_leftovers):
                # its own verdict, its own socket, and multiprocess's temp folder if it is the caller's.
                alive_r, alive_w = os.pipe()
                leftovers = [self.report, *owned, *_own_temp_dir()]
                # It leads a process group of its own so that it outlives a kill of its caller's
                # whole group, which is how Jupyter kills a kernel (a restart, or a shutdown that
                # did not finish in time: SIGKILL to the kernel's group); in the caller's group it
                # died with the kernel, and nobody was left to remove the kernel's files. It still
                # exits with the caller (the alive pipe), and keeps the caller's session (`ps -s`
                # finds it). A terminal's Ctrl-C no longer reaches it: once serving, it ignored it.
                group, first = ({"process_group": 0}, "") if sys.version_info >= (3, 11) else \
                    ({}, "import os; os.setpgid(0, 0)\n")  # 3.10: none in Popen; the forkserver's first step
                try:
                    cmd = (f"{first}from multiprocess.forkserver import main\n"
                           f"try:\n"
                           f"    main({listener.fileno()}, {alive_r}, {preload!r})\n"
                           f"finally:\n"
                           f"    from mpify.engine.warm import remove_leftovers\n"
                           f"    remove_leftovers({os.getpid()}, {leftovers!r})\n")
                    exe = spawn.get_executable()
                    self.proc = subprocess.Popen([exe, *util._args_from_interpreter_flags(), "-c", cmd],
                                                 pass_fds=(listener.fileno(), alive_r), env=env,
                                                 stdin=subprocess.DEVNULL, **group)
                except BaseException:
                    os.close(alive_w)
                    raise
                finally:
                    os.close(alive_r)
            self._forkserver_address, self.owned = address, owned
            self._forkserver_alive_fd = alive_w
            self._forkserver_pid = self.proc.pid
            debug("forkserver", self.proc.pid, "starting,", "quick" if self.quick else "complete",
                  "preload", heavy, self.signature[1])

        def ensure_running(self) -> None:
            # Called by connect_to_new_process: never restart in place (process_class chooses).
            if self._forkserver_address is None:
                raise RuntimeError("mpify: this forkserver was stopped")

        def alive(self) -> bool:
            return self.proc is not None and self.proc.poll() is None

        def ready(self) -> bool:
            """Whether its preloading is done (so it forks at once), reading its verdict once."""
            if self.verdict is None and os.path.exists(self.report):
                with open(self.report) as f:
                    self.verdict = json.load(f)
                _unlink(self.report)
                self.present = set(self.verdict.get("present", ()))
                debug("forkserver", self.proc.pid, "ready after", round(time.monotonic() - self.started, 2),
                      "s: preloaded", self.signature[0], self.verdict["loaded"],
                      "; could not import", self.verdict["missing"])
            return self.verdict is not None

        def usable(self) -> bool:
            """Ready, and holding nothing it refused. Its verdict is read by whoever asks first:
            one that says "refused" (a preload started a thread) is never forked from; _poll
            replaces it."""
            return self.ready() and not self.verdict.get("refused")

        def fits(self, wanted: tuple) -> bool:
            """It can serve `wanted` now or once ready: the heavy modules and the environment."""
            return (not self.retired and set(self.signature[0]) >= set(wanted[0])
                    and self.signature[2] == wanted[2])

        def complete(self, wanted: tuple) -> bool:
            """It holds (or will hold) every extra `wanted` asks for. A package it already holds
            as another's dependency counts (sympy comes with torch._dynamo)."""
            return self.fits(wanted) and set(wanted[1]) <= self.present | set(self.signature[1]) | _refused

        def retire(self, kill: bool = False) -> None:
            """Let it go: it exits once its ranks have (kill: at once, for one that has none)."""
            if self.retired:
                return
            self.retired = True
            if kill and self.proc is not None:
                self.proc.kill()
            try:
                os.close(self._forkserver_alive_fd)
            except (OSError, TypeError):
                pass
            owned = self.owned
            self._forkserver_alive_fd = self._forkserver_address = None

            def reap():
                if self.proc is not None:
                    self.proc.wait()
                with _files_lock:
                    if not _exiting:
                        _remove_owned(owned)
                _unlink(self.report)  # in TMPDIR itself, not in multiprocess's folder
                with _lock:
                    if self in _servers:
                        _servers.remove(self)
                _reapers.discard(threading.current_thread())

            # A retiring server may have ranks still running (a live world's): wait off the launch.
            reaper = threading.Thread(target=reap, name="mpify-forkserver-reaper", daemon=True)
            _reapers.add(reaper)
            reaper.start()

    def _own_temp_dir() -> list[str]:
        """multiprocess's temp folder (pymp-* in TMPDIR, where _listener makes the forkservers'
        sockets) if this process is the one whose exit removes it, as a list of zero or one path.

        Only that process's: multiprocess hands the folder's name on to every process it starts
        (a rank's config holds its caller's, and a rank that launches in turn makes its sockets
        there), and an os.fork child holds its parent's name and exit handler. The owner is the
        process that registered the folder's removal, read from multiprocess's registry of exit
        handlers; should that registry ever change shape, none: the folder is then left behind
        as before, and never one of a live process removed."""
        tempdir = util.get_temp_dir()
        try:
            for f in list(util._finalizer_registry.values()):
                if f._callback is util._remove_temp_dir and f._pid == os.getpid() and tempdir in f._args:
                    return [tempdir]
        except (AttributeError, TypeError):
            pass
        return []

    # A socket's path must fit sockaddr_un's sun_path: 108 bytes with the closing NUL on Linux.
    _SUN_PATH = 107

    def _listener() -> tuple[socket.socket, str, list[str]]:
        """A forkserver's listening socket (as multiprocess's ensure_running makes it): the socket,
        its address, which only this user may connect to, and what to remove once it is closed
        (the socket's file, then a folder made for it), in that order.

        The address is in multiprocess's temp folder (pymp-* in TMPDIR) unless that path is too
        long for a socket: a deep TMPDIR (a CI's per-test folder, a cluster's job folder) made
        bind fail with "AF_UNIX path too long" before any rank started. Then the socket goes in a
        folder of its own, private to this user (0700), under the first short system temp folder,
        as CPython 3.12's multiprocessing does for its own temp folder."""
        address = connection.arbitrary_address("AF_UNIX")
        owned = [address]
        if len(os.fsencode(address)) > _SUN_PATH:
            name = os.path.basename(address)
            for base in ("/tmp", "/var/tmp", "/usr/tmp", os.getcwd()):
                if os.path.isdir(base) and len(os.fsencode(base)) + 24 + len(name) <= _SUN_PATH:
                    break
            folder = tempfile.mkdtemp(prefix="mpify-", dir=base)  # 0700
            address = os.path.join(folder, name)
            owned = [address, folder]
            _outside.append(owned)
        listener = socket.socket(socket.AF_UNIX)
        try:
            listener.bind(address)
        except OSError:
            listener.close()
            _remove_owned(owned)
            raise
        os.chmod(address, 0o600)
        listener.listen()
        return listener, address, owned

    class Zygote(Server):
        """The caller forked into a forkserver (see the module's docstring): ready at once."""

        def launch(self) -> None:
            resource_tracker.ensure_running()  # in the caller, as for any server: ranks get its fd
            listener, address, owned = _listener()
            alive_r, alive_w = os.pipe()
            caller, leftovers = os.getpid(), [*owned, *_own_temp_dir()]  # as a Server's (launch)
            # What the caller printed but has not flushed would be printed again by the zygote.
            util._flush_std_streams()
            with warnings.catch_warnings():
                # 3.12+ warns at any fork of a process with several OS threads; the native pools
                # _may_fork_caller allows (numpy's OpenBLAS pool among them) would always trigger it.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
            if pid == 0:
                _serve_as_zygote(listener.fileno(), alive_r, caller, leftovers)  # never returns
            listener.close()
            os.close(alive_r)
            self.proc = _Forked(pid)
            self._forkserver_address, self.owned = address, owned
            self._forkserver_alive_fd = alive_w
            self._forkserver_pid = pid
            present = sorted(name for name in sys.modules if "." not in name)
            self.verdict = {"loaded": [], "missing": [], "present": present, "refused": None}
            self.present = set(present)
            debug("forked the caller as forkserver", pid, "(zygote)")

        def ready(self) -> bool:
            return True

    class _Forked:
        """What a Server needs of subprocess.Popen (pid, poll, wait, kill) for a forked child."""

        def __init__(self, pid: int):
            self.pid, self.returncode = pid, None

        def _reap(self, flags: int):
            if self.returncode is None:
                try:
                    pid, status = os.waitpid(self.pid, flags)
                except ChildProcessError:  # reaped by another thread's wait
                    self.returncode = -1
                    return self.returncode
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
            return self.returncode

        def poll(self):
            return self._reap(os.WNOHANG)

        def wait(self):
            return self._reap(0)

        def kill(self):
            if self.poll() is None:
                try:
                    os.kill(self.pid, 9)
                except ProcessLookupError:
                    pass

    def _may_fork_caller() -> bool:
        """Whether the caller can be forked safely now: no Python thread but this one, and CUDA
        never initialised (a forked child cannot use it, and its context holds threads).

        Native pools are allowed: OpenBLAS starts one at numpy's import (so every forkserver has
        it too), torch's OpenMP pool after its first parallel op. Their idle workers wait on a
        condition, which releases its mutex, so a fork copies no held lock; fork-based DataLoader
        workers meet the same pools. A Python thread is another matter: it may hold any lock
        (logging's, a stream's, an import's) at the moment of the fork; a user's thread (tqdm's
        monitor, a data prefetcher) means no fork. A Jupyter kernel's own threads do not (see
        _kernels_own)."""
        from mpify.engine import warm

        if not _zygote_allowed():
            return False
        # mpify's own reapers are the exception: each waits in waitpid or for _lock, which the
        # child replaces (_forget_inherited_forkserver). One is still waiting for the previous
        # zygote when a script's next launch comes right after its first.
        others = [t for t in threading.enumerate()
                  if t is not threading.current_thread() and t not in _reapers and not _kernels_own(t)]
        return not others and not warm.cuda_initialised()

    # The threads a Jupyter kernel runs for itself: ipykernel's IOPub, heartbeat, control, shell
    # channel, output-capture and parent-poller threads, IPython's history saver; and the thread
    # of mpify's own prewarm, which starts forkservers under _lock (held by the launch that
    # forks). What they hold is never touched in the zygote: it serves forks through its own
    # listener, every other fd (each zmq socket's, the history database's) points to /dev/null
    # there, and sys.stdout/sys.stderr become plain files on fd 1/2 (_serve_as_zygote). Only the
    # first launch right after `import mpify` meets this: later ones find a forkserver ready.
    _KERNEL_MODULES = ("ipykernel.", "IPython.", "jupyter_client.", "zmq.")

    def _kernels_own(t: threading.Thread) -> bool:
        if t.name == "mpify-prewarm":
            return True
        target = getattr(t, "_target", None)  # None once run() has returned
        where = getattr(target, "__module__", None) or ""
        return where.startswith(_KERNEL_MODULES) or type(t).__module__.startswith(_KERNEL_MODULES)

    _kept_streams: list = []

    def _serve_as_zygote(listener_fd: int, alive_r: int, caller: int, leftovers: list[str]) -> None:
        """The zygote's life: let go of what the caller holds, then serve forks until the caller
        and every rank are gone, and remove the caller's `leftovers` if it was killed (as a
        Server's forkserver does, warm.remove_leftovers). Leaves only through os._exit: the
        caller's atexit handlers and finalizers are the caller's, never run twice."""
        import gc
        import signal
        import traceback

        code = 0
        try:
            os.setpgid(0, 0)  # a process group of its own, as a Server's forkserver (see Server.launch)
            null = os.open(os.devnull, os.O_RDWR)
            for name in os.listdir("/proc/self/fd"):
                fd = int(name)
                if fd in (0, 1, 2, listener_fd, alive_r, null):
                    continue
                try:
                    os.dup2(null, fd)
                except OSError:  # the listing's own fd, closed since
                    pass
            # The caller's Python-level handlers (the launch's own SIGINT guard among them) belong
            # to the caller; a fresh forkserver has Python's defaults, and so do the ranks.
            signal.set_wakeup_fd(-1)
            for sig in signal.valid_signals():
                try:
                    if callable(signal.getsignal(sig)):
                        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
                except (OSError, ValueError, TypeError):
                    pass
            # A kernel's sys.stdout/sys.stderr hand their text to its IOPub thread, which is not
            # in this process: plain files on fd 1/2 instead (a script's were those already).
            # The old ones are kept referenced: freeing one would run its finalizer here.
            _kept_streams.extend((sys.stdout, sys.stderr))
            sys.stdout = open(1, "w", buffering=1, closefd=False)
            sys.stderr = open(2, "w", buffering=1, closefd=False)
            gc.freeze()  # as warm.py: a rank's collections never walk (so never copy) what it shares
            from multiprocess.forkserver import main
            try:
                main(listener_fd, alive_r, [])
            except SystemExit:  # main's way out: the alive pipe reached EOF
                pass
            from mpify.engine.warm import remove_leftovers
            remove_leftovers(caller, leftovers)
        except BaseException:
            code = 1
            try:
                traceback.print_exc()
            except BaseException:
                pass
        finally:
            os._exit(code)

    class RankPopen(popen_forkserver.Popen):
        """popen_forkserver.Popen, minus the two keys that make the child import `__main__`, and
        forking from the server this launch chose rather than multiprocess's own.

        multiprocess, like multiprocessing, re-imports the parent's main script in every child so
        that functions defined there can be found by name. mpify ships fn by value (dill), so that
        is pure cost, and worse: a script that calls ranch without an `if __name__ == "__main__"`
        guard would launch again from every rank."""

        def _launch(self, process_obj):
            main = sys.modules.get("__main__")
            if main is not None and not hasattr(main, "__spec__"):
                # IPython's `%reset -f` deletes the notebook's dunders, and multiprocess reads
                # `__main__.__spec__` unguarded; None is what an interactive __main__ has.
                main.__spec__ = None
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
            self.sentinel, w = _serving.connect_to_new_process(self._fds)
            _parent_w = os.dup(w)  # the child's view of its parent's liveness, as upstream
            self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
            with open(w, "wb", closefd=True) as f:
                f.write(buf.getbuffer())
            self.pid = read_signed(self.sentinel)

    class RankProcess(ForkServerProcess):
        # At module level, not made in a function: the process object is pickled to the
        # forkserver, and dill pickles a class it cannot import by name by value, together with
        # the modules it references; under `pip install --target` those include multiprocess's
        # own, which hold a thread-local that cannot be pickled.
        @staticmethod
        def _Popen(process_obj):
            return RankPopen(process_obj)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _remove_owned(paths: list[str]) -> None:
    """Remove a listener's socket file, then the folder made for it (_listener), if there."""
    if paths in _outside:
        _outside.remove(paths)
    for path in paths:
        try:
            os.rmdir(path) if os.path.isdir(path) else os.unlink(path)
        except OSError:
            pass


def context() -> mp.context.BaseContext:
    """The multiprocess context whose Pipes the ranks' ends are made with."""
    return mp.get_context("spawn" if sys.platform == "win32" else "forkserver")


def process_class():
    """The Process class to start this launch's ranks with, its forkserver chosen (see the
    module's docstring): complete and ready, else ready and fitting, else the first to be ready."""
    if sys.platform == "win32":
        return mp.get_context("spawn").Process
    global _serving
    with _lock:
        wanted = _wanted_signature()
        _poll()
        ready = [s for s in _servers if not s.retired and s.usable()]
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
        for s in list(_servers):
            if s is chosen or s.retired or (keep_starting and not s.ready() and s.complete(wanted)):
                continue
            s.retire(kill=not s.ready())  # one still starting has no rank: stop it now
        _serving = chosen
        debug("ranks fork from forkserver", chosen.proc.pid, "(complete)" if chosen.complete(wanted) else
              "(not complete: the ranks import what it lacks themselves)")
    return RankProcess


def _zygote_allowed() -> bool:
    """Whether a caller may be forked at all here (MPIFY_ZYGOTE, Linux); see _may_fork_caller."""
    return os.environ.get("MPIFY_ZYGOTE", "1") != "0" and sys.platform == "linux"


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
        with _lock:
            for s in _servers:  # first: a failure to start a server below must not keep it alive
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
    with _lock:
        wanted = _wanted_signature(installed_heavy=True)
        _poll()
        if not _zygote_allowed():
            _ensure(wanted, quick=True)
        _ensure(wanted, quick=False)


def _ensure(wanted: tuple, quick: bool) -> None:
    """Start a server of this kind for `wanted` unless a live one (ready or starting) already
    serves it: one that fits, for a quick one; one that is complete, for a complete one."""
    if not any(s.fits(wanted) if quick else s.complete(wanted) for s in _servers if not s.retired):
        _start(wanted, quick)


def _start(wanted: tuple, quick: bool, zygote: bool = False) -> "Server":
    server = (Zygote if zygote else Server)(wanted, quick)
    server.launch()
    _servers.append(server)
    return server


def _poll() -> None:
    """Read the verdicts that came in; a server that preloaded a refused module is replaced."""
    for s in list(_servers):
        if s.retired:
            continue
        if not s.alive():
            debug("forkserver", s.proc.pid, "is gone")
            s.retire()
        elif s.ready() and s.verdict.get("refused"):
            refused = s.verdict["refused"]
            debug(f"not preloading {refused}: {s.verdict['why']} in the forkserver; ranks import it themselves")
            _refused.add(refused)
            s.retire(kill=True)  # it holds the module it refused: never fork from it
            _start((s.signature[0], tuple(m for m in s.signature[1] if m != refused), s.signature[2]), quick=False)


def _first_ready(wanted: tuple) -> "Server":
    """Wait for the first fitting server to finish preloading (the ranks would wait for it anyway:
    a forkserver forks only once it is done)."""
    deadline = time.monotonic() + _PRELOAD_WAIT
    while True:
        _poll()
        fitting = [s for s in _servers if s.fits(wanted)]
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
        with _lock:
            wanted = _wanted_signature()
            _poll()
            for s in _servers:
                if not s.retired and s.complete(wanted) and s.usable():
                    return s.proc.pid
            _ensure(wanted, quick=False)
        if time.monotonic() > deadline:
            raise TimeoutError(f"mpify: no complete forkserver was ready after {timeout:.0f} s")
        time.sleep(0.01)


def server_pids() -> set[int]:
    """The forkservers of this process, starting, serving or retiring (for tests and tools)."""
    with _lock:
        return {s.proc.pid for s in _servers if s.proc is not None and s.proc.poll() is None}


def shutdown() -> None:
    """Stop the warm forkservers; the next launch starts a new one."""
    if sys.platform == "win32":
        return
    with _lock:
        servers = list(_servers)
    for s in servers:
        s.retire(kill=not s.ready())
    for s in servers:
        if s.proc is not None:
            s.proc.wait()


def _kill_starting() -> None:
    """At exit: a forkserver still preloading notices its caller has gone only when it is done
    (seconds of CPU for nothing); one that has no rank yet is stopped now."""
    for s in list(_servers):
        if not s.retired and s.verdict is None:
            s.retire(kill=True)


def _forget_inherited_forkserver() -> None:
    """In a child forked from a caller: start its own forkservers when it launches.

    The parent's forkservers are not this process's children (waiting on them fails) and their
    sockets belong to the parent. Their alive pipes are closed here so that they still stop when
    the parent goes."""
    global _lock, _servers, _serving, _reapers, _files_lock
    _lock = threading.Lock()  # another thread of the parent may have held it at the fork
    _files_lock = threading.Lock()
    _reapers = set()
    for s in _servers:
        try:
            os.close(s._forkserver_alive_fd)
        except (OSError, TypeError):
            pass
    _servers, _serving = [], None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_inherited_forkserver)


def _at_exit() -> None:
    """Registered after multiprocess's exit handler, so run before it (atexit runs in reverse)."""
    global _exiting
    with _files_lock:
        _exiting = True
        for owned in list(_outside):
            _remove_owned(owned)
    _kill_starting()


atexit.register(_at_exit)
