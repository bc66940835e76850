"""Rank output in the caller: whole lines, prefixed `[rank N] `, as they are written.

Each child's fd 1 and 2 are pipes read by the launch's supervisor thread. Bytes are cut into
lines here and written to the caller's sys.stdout / sys.stderr as captured at launch, so in
Jupyter they land in the cell that launched the ranks (ipykernel routes a thread's output to the
cell that started it), one whole line at a time, never interleaved mid-line between ranks.
"""
from __future__ import annotations

import os
import threading
from typing import Callable, Iterable, TextIO

# How long a rank's line waits for the caller's rank to finish the line it is printing (print()
# writes the text and the newline separately); a line left open longer (a progress bar redrawn
# with '\r') is not waited for.
PATIENCE = 0.2


class LineGate:
    """Stands in for the caller's sys.stdout / sys.stderr during a launch, so that the ranks'
    lines are written between the caller's own lines, never into the middle of one.

    Everything but `write` is the wrapped stream's (fileno, encoding, isatty, getvalue...)."""

    def __init__(self, stream: TextIO):
        self._stream = stream
        self._cond = threading.Condition()
        self._at_line_start = True
        self._waiting = 0  # ranks' forwarders waiting for the caller's line to end
        self._lines = 0  # line ends the caller has written
        self._gave_up_on = -1  # the caller's line a forwarder stopped waiting for

    def write(self, text: str) -> int:
        with self._cond:
            if text and self._at_line_start and self._waiting:
                # A rank's lines are waiting for this line break: let them in before a new line.
                self._cond.wait_for(lambda: not self._waiting, timeout=PATIENCE)
            n = self._stream.write(text)
            if text:
                self._at_line_start = text.endswith("\n")
                if self._at_line_start:
                    self._lines += 1
                    self._cond.notify_all()
            return n

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def write_lines(self, text: str) -> None:
        """Whole lines from a rank: after the caller's current line, if it ends soon."""
        with self._cond:
            self._waiting += 1
            try:
                if self._gave_up_on != self._lines:  # waited in vain on this very line already
                    if not self._cond.wait_for(lambda: self._at_line_start, timeout=PATIENCE):
                        self._gave_up_on = self._lines
                self._stream.write(text)
                self._stream.flush()
            finally:
                self._waiting -= 1
                self._cond.notify_all()

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def rank_filter(show_ranks: None | int | Iterable[int]) -> Callable[[int], bool]:
    """show_ranks: None shows every rank, an int or an iterable of ints shows only those."""
    if show_ranks is None:
        return lambda rank: True
    problem = TypeError("show_ranks must be None, a rank number or a collection of rank numbers, "
                        f"not {show_ranks!r}")
    if isinstance(show_ranks, (bool, str, bytes)):
        raise problem
    if isinstance(show_ranks, int):
        show_ranks = (show_ranks,)
    try:
        wanted = frozenset(show_ranks)
    except TypeError:
        raise problem from None
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in wanted):
        raise problem
    return wanted.__contains__


class LineForwarder:
    """Collects one stream of one rank and emits it line by line to `sink` with a prefix."""

    def __init__(self, rank: int, sink: TextIO, shown: bool):
        self.prefix = f"[rank {rank}] "
        self.sink = sink
        self.shown = shown
        self._pending = b""

    def feed(self, data: bytes) -> None:
        if not self.shown:
            return
        self._pending += data
        if b"\n" not in data:
            return
        *lines, self._pending = self._pending.split(b"\n")
        self._emit(lines)

    def close(self) -> None:
        if self._pending and self.shown:
            self._emit([self._pending])
        self._pending = b""

    def _emit(self, lines: list[bytes]) -> None:
        text = "".join(self.prefix + self._last_frame(line) + "\n" for line in lines)
        try:
            if isinstance(self.sink, LineGate):
                self.sink.write_lines(text)
            else:
                self.sink.write(text)
                self.sink.flush()
        except (OSError, ValueError):  # the caller's stream was closed; nothing left to show it on
            pass

    @staticmethod
    def _last_frame(line: bytes) -> str:
        # A progress bar redraws with '\r'; a terminal would only show the last frame.
        text = line.decode("utf-8", errors="backslashreplace").rstrip("\r")
        return text.rsplit("\r", 1)[-1]


def pump(streams: dict, conn) -> None:
    """Feed what one of a rank's output pipes holds now to its forwarder (`streams[conn]`); at the
    pipe's end, flush the forwarder, close the pipe and forget it."""
    try:
        data = os.read(conn.fileno(), 65536)
    except OSError:
        data = b""
    fwd = streams[conn]
    if data:
        fwd.feed(data)
    else:
        fwd.close()
        del streams[conn]
        conn.close()
