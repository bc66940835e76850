"""The caller's side of Ctrl-C and of aborting rank 0, while a launch is running.

Jupyter's "Interrupt kernel" sends SIGINT to the kernel. Python runs its SIGINT handler only
when the main thread returns to the interpreter, so a rank 0 blocked in a gloo recv would never
see it. Two things fix that: `signal.set_wakeup_fd` makes the C-level handler write a byte the
supervisor thread sees at once, and the supervisor then stops the other ranks, whose closing
sockets make the blocked call return, so the Python handler runs and raises KeyboardInterrupt.

The same handler lets the supervisor abort rank 0 when another rank failed: it sets `abort` and
sends SIGINT to the main thread; the handler raises RankAborted only while the user's fn itself is
running (never inside ctx teardown such as destroy_process_group). Off the main thread, where
Python allows no signal handler, an asynchronous exception does the same.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading

from mpify.engine.rank.child import _in_fn


class RankAborted(BaseException):
    """Raised in the caller's rank when the launch is being stopped for another rank's failure or
    a timeout. Internal: ranch replaces it with the real cause. BaseException, like
    KeyboardInterrupt, so a user's `except Exception` in fn does not swallow it."""


class InterruptGuard:
    """Installed for the duration of one launch, in the thread that runs the caller's rank."""

    def __init__(self):
        self.main = threading.current_thread() is threading.main_thread()
        self.thread_id = threading.get_ident()
        self.abort = threading.Event()
        self.interrupted = threading.Event()
        self.wakeup_r = self.wakeup_w = -1
        self._old_handler = None
        self._old_wakeup = -1

    def __enter__(self) -> "InterruptGuard":
        if self.main:
            self.wakeup_r, self.wakeup_w = os.pipe()
            os.set_blocking(self.wakeup_w, False)
            os.set_blocking(self.wakeup_r, False)
            self._old_handler = signal.signal(signal.SIGINT, self._on_sigint)
            self._old_wakeup = signal.set_wakeup_fd(self.wakeup_w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.main:
            signal.set_wakeup_fd(self._old_wakeup)
            signal.signal(signal.SIGINT, self._old_handler)
            os.close(self.wakeup_r)
            os.close(self.wakeup_w)

    def _on_sigint(self, signum, frame):
        if self.abort.is_set():
            if _in_fn.is_set():
                raise RankAborted()
            return  # our own abort signal arrived outside fn: ctx teardown must finish
        self.interrupted.set()
        raise KeyboardInterrupt()

    def read_wakeup(self) -> bool:
        """Drain the wakeup pipe; True if a SIGINT that is not our own abort arrived."""
        try:
            data = os.read(self.wakeup_r, 512)
        except BlockingIOError:
            return False
        if signal.SIGINT in data and not self.abort.is_set():
            self.interrupted.set()
            return True
        return False

    def abort_caller_rank(self) -> None:
        """Ask the caller's rank to stop (called from the supervisor thread)."""
        self.abort.set()
        if not _in_fn.is_set():
            return
        if self.main:
            signal.pthread_kill(self.thread_id, signal.SIGINT)
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(self.thread_id),
                                                       ctypes.py_object(RankAborted))


class WakeupRelay:
    """For a live world's whole life: Ctrl-C seen while the caller's main thread is stuck in C++
    outside any round (a plain notebook cell calling a collective on rank 0 alone).

    Python allows one wakeup fd per process; asyncio (a Jupyter kernel's loop) may hold it
    already. The relay takes it and passes every byte on to the one it replaced, so whoever was
    listening still hears every signal. A round's InterruptGuard sets its own on top and puts
    the relay's back when it ends. Main thread only (Python's rule for set_wakeup_fd)."""

    def __init__(self):
        self.read_fd = self._write_fd = -1
        self._previous = -1
        self.installed = False

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.read_fd, self._write_fd = os.pipe()
        os.set_blocking(self.read_fd, False)
        os.set_blocking(self._write_fd, False)
        self._previous = signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        self.installed = True

    def read(self) -> bool:
        """Drain the pipe, pass the bytes on; True if a SIGINT was among them."""
        try:
            data = os.read(self.read_fd, 512)
        except (BlockingIOError, OSError):
            return False
        if self._previous != -1:
            try:
                os.write(self._previous, data)
            except OSError:  # its owner closed it or it is full: the signal was seen anyway
                pass
        return signal.SIGINT in data

    def uninstall(self) -> None:
        """Put the replaced wakeup fd back (if ours is still the one set, and from the main thread)."""
        if not self.installed:
            return
        self.installed = False
        if threading.current_thread() is threading.main_thread():
            current = signal.set_wakeup_fd(self._previous, warn_on_full_buffer=False)
            if current != self._write_fd:  # somebody replaced ours meanwhile: theirs stays
                signal.set_wakeup_fd(current, warn_on_full_buffer=False)
        # From another thread (atexit runs on the main thread; a close from elsewhere is rare)
        # the fd stays set: its pipe is kept open below so a signal never writes to a stale fd.
        else:
            return
        for fd in (self.read_fd, self._write_fd):
            os.close(fd)
