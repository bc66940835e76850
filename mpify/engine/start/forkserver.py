"""One forkserver process (`Server`), and how a launch's ranks are forked from the one that
pool.py chose for it.

A caller that is killed (SIGKILL, the OOM killer) runs no exit handler, so the files its exit
would have removed stay: multiprocess's `pymp-*` folder (the forkservers' sockets are made in it)
and a forkserver's verdict it had not read. Each forkserver and zygote is told at its start which
of them are its caller's (its own socket and verdict, and the folder if the caller owns it:
_own_temp_dir), and removes them at its exit if the caller is gone by then (warm.remove_leftovers).
It exits once the caller and every rank have closed its alive pipe, and the ranks end themselves
when their caller dies (rank/child.py's watchdog). It leads a process group of its own, so that it
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

from mpify.engine.debug import debug

# Always preloaded: what every rank runs before the user's function.
BASE_MODULES = ("dill", "mpify.engine.rank.child")

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
            self.verdict: dict | None = None  # warm.py's, once its preloading is done
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

            from mpify.engine.start import warm

            heavy, extras, _ = self.signature
            resource_tracker.ensure_running()  # its fd goes to every rank (connect_to_new_process)
            preload = list(BASE_MODULES) + list(heavy) + ["mpify.engine.start.warm"]
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
                           f"    from mpify.engine.start.warm import remove_leftovers\n"
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
