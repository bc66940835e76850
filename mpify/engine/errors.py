"""The exceptions a launch can raise, small and typed (after torch's multiprocessing/spawn.py).

A rank's own exception is re-raised in the caller with its original type whenever it can be
rebuilt; these types cover what has no original type: a rank that died without raising, a rank
whose exception could not be rebuilt, a timeout, arguments that cannot travel to a rank, and a
live world that was closed.
"""
from __future__ import annotations

import signal
import sys

if sys.version_info < (3, 11):
    # Exceptions have no notes before 3.11 (PEP 678). The backport's import makes tracebacks and
    # the default sys.excepthook print `__notes__` as 3.11 does; IPython 8 prints them itself.
    __import__("exceptiongroup")


def add_note(exc: BaseException, note: str) -> None:
    """Add `note` to the exception's notes (shown under its message), once."""
    notes = getattr(exc, "__notes__", None) or []
    if note in notes:
        return
    if hasattr(exc, "add_note"):
        exc.add_note(note)
    else:  # 3.10: the attribute PEP 678 reads, set by hand
        try:
            exc.__notes__ = [*notes, note]
        except AttributeError:  # a type with __slots__ and no __dict__: nowhere to put it
            pass


class MpifyError(Exception):
    """Base class of every error mpify raises on its own account."""


class RemoteTraceback(Exception):
    """Carries a rank's formatted traceback text; set as ``__cause__`` of the re-raised error so
    Jupyter and plain tracebacks show where in the rank the error happened."""

    def __init__(self, text: str):
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n" + self.text


class RankRaisedError(MpifyError):
    """A rank raised an exception whose type could not be rebuilt in the caller."""

    def __init__(self, rank: int, type_name: str, message: str, traceback_text: str):
        super().__init__(f"rank {rank} raised {type_name}: {message}")
        self.rank = rank
        self.type_name = type_name
        self.message = message
        self.traceback_text = traceback_text

    def __reduce__(self):
        # Exception's own reduce would call __init__ with the formatted message alone; a nested
        # launch sends this error from a rank to its caller, where it must rebuild as itself.
        return type(self), (self.rank, self.type_name, self.message, self.traceback_text)


def describe_exit(exitcode: int) -> str:
    """'exit code 3' or 'signal SIGKILL', with the usual cause of a SIGKILL spelt out."""
    if exitcode >= 0:
        return f"exit code {exitcode}"
    try:
        name = signal.Signals(-exitcode).name
    except ValueError:
        name = f"signal {-exitcode}"
    text = f"signal {name}"
    if -exitcode == signal.SIGKILL:
        text += " (the out-of-memory killer is a usual cause of SIGKILL; see `dmesg`)"
    return text


class RankDiedError(MpifyError):
    """A rank ended without raising: it exited (os._exit, sys.exit in C code, a crash) or was
    killed by a signal."""

    def __init__(self, rank: int, exitcode: int):
        super().__init__(f"rank {rank} died without raising an exception: {describe_exit(exitcode)}")
        self.rank = rank
        self.exitcode = exitcode

    def __reduce__(self):  # see RankRaisedError.__reduce__
        return type(self), (self.rank, self.exitcode)


class LaunchTimeoutError(MpifyError, TimeoutError):
    """The launch ran past its ``timeout``; every rank was stopped."""


class ShipError(MpifyError, TypeError):
    """The function, an argument or the context could not be pickled to travel to the ranks.
    Raised before any process starts."""


class ResultError(MpifyError, TypeError):
    """A rank's return value could not be pickled back to the caller."""


class WorldClosedError(MpifyError, RuntimeError):
    """The world was closed (by `close()`, or after a rank died); start a new one."""


class LaunchBusyError(MpifyError, RuntimeError):
    """Another thread of this process is in the middle of a launch. Launches share the process's
    os.environ, working directory, signal handlers and standard streams, so two at once from two
    threads would step on each other; a launch from inside fn (nested) is fine."""
