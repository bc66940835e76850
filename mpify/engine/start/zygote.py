"""The zygote: the caller forked into a forkserver, for a launch that would otherwise wait for one
(pool.py chooses when).

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
"""
from __future__ import annotations

import os
import sys
import threading
import warnings

from mpify.engine.debug import debug
from mpify.engine.start import forkserver


def _zygote_allowed() -> bool:
    """Whether a caller may be forked at all here (MPIFY_ZYGOTE, Linux); see _may_fork_caller."""
    return os.environ.get("MPIFY_ZYGOTE", "1") != "0" and sys.platform == "linux"


if sys.platform != "win32":
    from multiprocess import resource_tracker, util

    from mpify.engine.start.forkserver import Server, _listener, _own_temp_dir

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
        from mpify.engine.start import warm

        if not _zygote_allowed():
            return False
        # mpify's own reapers are the exception: each waits in waitpid or for _lock, which the
        # child replaces (_forget_inherited_forkserver). One is still waiting for the previous
        # zygote when a script's next launch comes right after its first.
        others = [t for t in threading.enumerate()
                  if t is not threading.current_thread() and t not in forkserver._reapers and not _kernels_own(t)]
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
            from mpify.engine.start.warm import remove_leftovers
            remove_leftovers(caller, leftovers)
        except BaseException:
            code = 1
            try:
                traceback.print_exc()
            except BaseException:
                pass
        finally:
            os._exit(code)
