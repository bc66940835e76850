"""Rank output in the caller: whole lines, prefixed `[rank N] `, as they are written.

Each child's fd 1 and 2 are pipes read by the launch's supervisor thread. Bytes are cut into
lines here and written to the caller's sys.stdout / sys.stderr as captured at launch, so in
Jupyter they land in the cell that launched the ranks (ipykernel routes a thread's output to the
cell that started it), one whole line at a time, never interleaved mid-line between ranks.

A line still being redrawn with '\r' (a progress bar) is handed, a few frames a second, to the
live renderer of the caller's stream where it has one (a notebook cell, a terminal: bars.py); a
pipe or a file gets the whole line once it ends, as the final frame only.

A line that carries a child rank's display (rank/displays.py: `plt.show()`, `display(df)`) is shown as
a display output of the cell, labelled with the rank (bars.JupyterBars.rich), at most
RICH_PER_SECOND a second from one rank (a burst of RICH_BURST), each at most RICH_MAX_BYTES:
a rank that displays in a tight loop cannot flood the kernel; what is left out is counted in a
line of the rank's. Updates of one display (a `DisplayHandle`) are shown at most once per INTERVAL,
the latest one, as a bar's frames are.
"""
from __future__ import annotations

import os
import threading
import time
from typing import Callable, Iterable, TextIO

from mpify.engine.rank import displays
from mpify.engine.output.bars import INTERVAL, TerminalBars, choose
from mpify.engine.debug import debug as _debug

# A child rank's displays: how many a second reach the cell, how many at once, how large each.
RICH_PER_SECOND = 5
RICH_BURST = 10
RICH_MAX_BYTES = 8 * 2**20
_MARK = displays.MARK.encode()
_END = displays.END.encode()

# How long a rank's line waits for the caller's rank to finish the line it is printing (print()
# writes the text and the newline separately); a line left open longer (a progress bar redrawn
# with '\r') is not waited for.
PATIENCE = 0.2


class LineGate:
    """Stands in for the caller's sys.stdout / sys.stderr during a launch, so that the ranks'
    lines are written between the caller's own lines, never into the middle of one.

    Everything but `write` is the wrapped stream's (fileno, encoding, isatty, getvalue...).
    `live_bars` is the stream's live renderer (bars.py) or None; on a terminal every write, the
    caller's and the ranks', goes through it, so rank lines go above the caller's open line
    rather than waiting for it to end."""

    def __init__(self, stream: TextIO, live_bars=None):
        self._stream = stream
        self.live_bars = live_bars
        self._screen = live_bars if isinstance(live_bars, TerminalBars) else None
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
            if self._screen is not None:
                n = self._screen.caller_write(self._stream, text)
            else:
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
        if self._screen is not None:
            self._screen.lines(text)
            return
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


def gates(stdout: TextIO, stderr: TextIO) -> tuple[LineGate, LineGate]:
    """The gates for a launch's (or a round's) caller streams, with their live renderers."""
    out_bars, err_bars = choose(stdout, stderr)
    return LineGate(stdout, out_bars), LineGate(stderr, err_bars)


def close_gates(*gates: LineGate) -> None:
    for gate in gates:
        if gate.live_bars is not None:
            gate.live_bars.close()


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
    """Collects one stream of one rank and emits it line by line to `sink` with a prefix; a line
    being redrawn with '\r' goes meanwhile, as its latest frame, to the sink's live renderer
    (`sink.live_bars`, looked up at each frame), at most one frame per INTERVAL: the frame waits
    here, and the supervisor calls `tick` when it is due (see `next_due`)."""

    def __init__(self, rank: int, sink: TextIO, shown: bool, name: str = "", prefix: str | None = None):
        # `prefix`: given for a node's lines (slurm/agents.py), which its own forwarders prefixed already
        self.prefix = f"[rank {rank}] " if prefix is None else prefix
        self.key = (rank, name)
        self.sink = sink
        self.shown = shown
        self._pending = b""
        self._frame: str | None = None  # the open line's latest frame, not shown yet
        self._next = 0.0  # when the next frame may be shown
        self._shown_on = None  # the renderer showing this line's bar
        self._tokens = float(RICH_BURST)  # displays this rank may show now (a token bucket)
        self._refilled = time.monotonic()
        self._left_out = 0  # displays not shown since the last note about it
        self._updates: dict = {}  # display id -> its latest update, not shown yet
        self._next_update = 0.0

    def feed(self, data: bytes) -> None:
        if not self.shown:
            return
        self._pending += data
        if b"\n" in data:
            *lines, self._pending = self._pending.split(b"\n")
            self._emit(lines)
        if b"\r" not in self._pending:
            return
        # The open line is being redrawn. Only its last frame counts: the frames before it go (an
        # hour-long bar would otherwise keep every frame it drew until its line ends).
        frame_at = self._pending.rstrip(b"\r").rfind(b"\r")
        if frame_at > 0:
            self._pending = self._pending[frame_at:]
        if getattr(self.sink, "live_bars", None) is not None:
            frame = self._pending.rstrip(b"\r").rsplit(b"\r", 1)[-1]
            # A frame cut by the read (a multi-byte character at its end) loses only that character.
            self._frame = frame.decode("utf-8", errors="ignore")
            self.tick(time.monotonic())

    def tick(self, now: float) -> float | None:
        """Show the waiting frame and display updates if their time has come; when one must
        wait, the time it is due."""
        due = [t for t in (self._tick_updates(now), self._tick_frame(now)) if t is not None]
        return min(due, default=None)

    def _tick_updates(self, now: float) -> float | None:
        if not self._updates:
            return None
        if now < self._next_update:
            return self._next_update
        updates, self._updates = list(self._updates.values()), {}
        for msg in updates:
            self._show_rich(msg)
        self._next_update = now + INTERVAL
        return None

    def _tick_frame(self, now: float) -> float | None:
        if self._frame is None:
            return None
        if now < self._next:
            return self._next
        bars = getattr(self.sink, "live_bars", None)
        if bars is not None:
            try:
                bars.frame(self.key, self.prefix + self._frame)
                self._shown_on = bars
            except Exception as exc:  # a display that fails must not stop the launch: whole lines then
                _debug("live bar of", self.prefix, "not shown:", repr(exc))
        self._frame = None
        self._next = now + INTERVAL
        return None

    def close(self) -> None:
        if self._pending and self.shown:
            self._emit([self._pending])
        self._pending = b""
        for msg in self._updates.values():
            self._show_rich(msg)
        self._updates = {}
        self._note_left_out()

    def _emit(self, lines: list[bytes]) -> None:
        self._frame = None
        if self._shown_on is not None and lines:
            # The bar's line ended: its final frame stays where the bar was.
            bars, self._shown_on = self._shown_on, None
            try:
                if bars.end(self.key, self.prefix + self._last_frame(lines[0])):
                    lines = lines[1:]
            except Exception as exc:  # as in tick: the line is then written as an ordinary one
                _debug("live bar of", self.prefix, "not ended:", repr(exc))
        text_lines = []
        for line in lines:
            start = line.find(_MARK)
            end = line.find(_END, start + len(_MARK)) if start >= 0 else -1
            if end < 0:
                text_lines.append(line)
                continue
            if line[:start].strip():  # the rank's own open line, ended by the display
                text_lines.append(line[:start])
            self._write(text_lines)
            text_lines = []
            self._rich(line[start + len(_MARK):end])
            if line[end + len(_END):].strip():
                text_lines.append(line[end + len(_END):])
        self._write(text_lines)

    def _write(self, lines: list[bytes]) -> None:
        if not lines:
            return
        text = "".join(self.prefix + self._last_frame(line) + "\n" for line in lines)
        try:
            if isinstance(self.sink, LineGate):
                self.sink.write_lines(text)
            else:
                self.sink.write(text)
                self.sink.flush()
        except (OSError, ValueError):  # the caller's stream was closed; nothing left to show it on
            pass

    def _rich(self, payload: bytes) -> None:
        """A display line of the rank's: throttled, then shown (see the module's docstring)."""
        msg = displays.decode(payload.decode("utf-8", errors="replace"))
        if msg is None:
            return
        if msg.get("update") and msg.get("id") is not None:
            self._updates[msg["id"]] = msg  # the latest wins; tick shows it when due
            self.tick(time.monotonic())
            return
        now = time.monotonic()
        self._tokens = min(float(RICH_BURST), self._tokens + (now - self._refilled) * RICH_PER_SECOND)
        self._refilled = now
        if self._tokens < 1 or len(payload) > RICH_MAX_BYTES:
            self._left_out += 1
            return
        self._tokens -= 1
        self._note_left_out()
        self._show_rich(msg)

    def _show_rich(self, msg: dict) -> None:
        bars = getattr(self.sink, "live_bars", None)
        show = getattr(bars, "rich", None)
        if show is not None:
            data = msg["data"]
            if not msg.get("update") and "text/html" not in data and any(k.startswith("image/") for k in data):
                # A picture alone carries no visible label: its text line comes first, as a
                # notebook shows a value's repr above its plot.
                self._write([str(data.get("text/plain", "")).encode()])
            try:
                show(self.key[0], msg)
                return
            except Exception as exc:  # a display that fails must not stop the launch: its text then
                _debug("display of", self.prefix, "not shown:", repr(exc))
        if not msg.get("update"):
            self._write([str(msg["data"].get("text/plain", "")).encode()])

    def _note_left_out(self) -> None:
        if self._left_out:
            n, self._left_out = self._left_out, 0
            self._write([f"({n} display{'s' if n > 1 else ''} left out: at most {RICH_PER_SECOND} a second "
                         f"from one rank, each under {RICH_MAX_BYTES // 2**20} MiB)".encode()])

    @staticmethod
    def _last_frame(line: bytes) -> str:
        # A progress bar redraws with '\r'; a terminal would only show the last frame.
        text = line.decode("utf-8", errors="backslashreplace").rstrip("\r")
        return text.rsplit("\r", 1)[-1]


def next_due(forwarders: Iterable[LineForwarder]) -> float | None:
    """Show the bar frames whose time has come; the earliest time another one is due (None when
    no frame waits), for the supervisor's next wake-up."""
    now = time.monotonic()
    due = [t for t in (f.tick(now) for f in forwarders) if t is not None]
    return min(due, default=None)


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
