"""Rank output in the caller: whole lines, prefixed `[rank N] `, as they are written.

Each child's fd 1 and 2 are pipes read by the launch's supervisor thread. Bytes are cut into
lines here and written to the caller's sys.stdout / sys.stderr as captured at launch, so in
Jupyter they land in the cell that launched the ranks (ipykernel routes a thread's output to the
cell that started it), one whole line at a time, never interleaved mid-line between ranks.
"""
from __future__ import annotations

from typing import Callable, Iterable, TextIO


def rank_filter(show_ranks: None | int | Iterable[int]) -> Callable[[int], bool]:
    """show_ranks: None shows every rank, an int or an iterable of ints shows only those."""
    if show_ranks is None:
        return lambda rank: True
    if isinstance(show_ranks, bool):
        raise TypeError("show_ranks must be None, a rank number or a collection of rank numbers")
    if isinstance(show_ranks, int):
        show_ranks = (show_ranks,)
    wanted = frozenset(int(r) for r in show_ranks)
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
            self.sink.write(text)
            self.sink.flush()
        except (OSError, ValueError):  # the caller's stream was closed; nothing left to show it on
            pass

    @staticmethod
    def _last_frame(line: bytes) -> str:
        # A progress bar redraws with '\r'; a terminal would only show the last frame.
        text = line.decode("utf-8", errors="backslashreplace").rstrip("\r")
        return text.rsplit("\r", 1)[-1]
