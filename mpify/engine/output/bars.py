"""Live lines: a child rank's line redrawn with '\\r' (a tqdm bar) shown while it is redrawn.

A rank's output is forwarded as whole lines (lines.py), which is all a pipe or a file should get.
But a progress bar never ends its line until its loop is over, so whole lines alone show ranks
1..N-1 as silent while they train and then one final `100%` frame. Where the caller's stream can
show a line that changes, the forwarder hands each bar's latest frame (a few a second, see
INTERVAL) to one of the renderers here, chosen once per launch (and per `%%ranch` round) from the
caller's stream:

- `JupyterBars`: the caller is an ipykernel and its stream the kernel's: one display output per
  bar (`display(..., display_id=...)`, then `update_display`, as text/plain), so it works in
  JupyterLab, VS Code, Colab and in the saved notebook, with no widget. ipykernel sends a display
  published from another thread (the supervisor's) to the cell that runs now, as it does a stream.
- `TerminalBars`: the caller's stream is a terminal: one line per bar kept at the bottom, above
  the caller's own line being written (rank 0's own bar), redrawn with plain ANSI (cursor up,
  erase to the end of the screen); ordinary lines, the ranks' and the caller's, scroll above.

Rank 0 is the caller itself: its own bar is written as the caller writes it, never rendered here.
When a bar's line ends, its final frame stays (the display keeps it; on the terminal it becomes an
ordinary line). IPython is imported only once the caller is known to be a kernel.
"""
from __future__ import annotations

import os
import re
import sys
import threading
import unicodedata
import uuid
from typing import TextIO

# Seconds between two frames of one bar (4 a second): a user reads a bar at that rate, and a
# notebook's output channel, or a slow terminal, is never flooded. The latest frame is the one
# shown; frames in between are dropped, never queued.
INTERVAL = 0.25

Key = tuple  # (rank, stream name): one bar per stream of a rank


class JupyterBars:
    """One display output per bar in the running cell, updated in place."""

    def __init__(self) -> None:
        self._ids: dict[Key, str] = {}
        # A display id must never come back: a frontend updates every output with that id, in
        # whichever cell it is (an earlier launch's bar would change).
        self._prefix = f"mpify-bar-{uuid.uuid4().hex}"
        self._count = 0
        self._closed = False

    def frame(self, key: Key, text: str) -> None:
        from IPython.display import display, update_display

        if self._closed:  # the launch or the round is over; its cell may not be the running one
            return
        bundle = {"text/plain": text}
        if key in self._ids:
            update_display(bundle, raw=True, display_id=self._ids[key])
        else:
            self._count += 1
            self._ids[key] = f"{self._prefix}-{self._count}"
            display(bundle, raw=True, display_id=self._ids[key])

    def end(self, key: Key, text: str) -> bool:
        """The bar's line ended with `text`: it stays as the display's last frame. False when
        this bar was never shown here (the line is then an ordinary one)."""
        from IPython.display import update_display

        display_id = self._ids.pop(key, None)
        if display_id is None:
            return False
        update_display({"text/plain": text}, raw=True, display_id=display_id)
        return True

    def rich(self, rank: int, msg: dict) -> None:
        """A child rank's display (rank/displays.py): its bundle as a display output of the cell,
        labelled with the rank: `[rank N] ` before its text/plain and in its text/html, and
        {"mpify": {"rank": N}} in its metadata. A display id of the rank's maps to one of ours
        (never reused, as the bars' ids), so that its updates land on its own output."""
        from IPython.display import display, update_display

        if self._closed:
            return
        label = f"[rank {rank}] "
        data = dict(msg["data"])
        data["text/plain"] = label + str(data.get("text/plain", ""))
        if isinstance(data.get("text/html"), str):
            data["text/html"] = f'<div class="mpify-rank"><code>{label.strip()}</code></div>' + data["text/html"]
        metadata = dict(msg.get("metadata") or {})
        metadata["mpify"] = {"rank": rank}
        own = msg.get("id")
        if own is None:
            display(data, raw=True, metadata=metadata)
            return
        key = ("display", rank, own)
        if msg.get("update") and key in self._ids:
            update_display(data, raw=True, metadata=metadata, display_id=self._ids[key])
            return
        if key not in self._ids:
            self._count += 1
            self._ids[key] = f"{self._prefix}-{self._count}"
        display(data, raw=True, metadata=metadata, display_id=self._ids[key])

    def close(self) -> None:
        self._closed = True
        self._ids.clear()


_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class TerminalBars:
    """The bottom of a terminal: the live bars in rank order, then the caller's open line (what
    it has written since its last line end; the cursor is at its end). Every write to this
    terminal during the launch, the caller's and the ranks', goes through here, under one lock, so
    what is on the screen is known and can be redrawn."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lock = threading.Lock()
        self._bars: dict[Key, str] = {}
        self._open = ""  # the caller's open line as shown (its last '\r' frame)
        self._up = 0  # rows from the first drawn row down to the cursor's
        self._closed = False

    # ---- what the ranks' forwarders hand over ------------------------------------------------
    def frame(self, key: Key, text: str) -> None:
        with self._lock:
            if self._closed:
                return
            self._bars[key] = text
            self._draw()

    def end(self, key: Key, text: str) -> bool:
        with self._lock:
            if self._closed or key not in self._bars:
                return False
            del self._bars[key]
            self._draw(above=text + "\n")
            return True

    def lines(self, text: str) -> None:
        """A rank's whole lines: above the bars and the caller's open line, never inside it."""
        with self._lock:
            if self._closed or (not self._bars and not self._open):
                self.out.write(text)  # nothing live on the screen: exactly what a pipe gets
                self.out.flush()
            else:
                self._draw(above=text)

    # ---- what the caller writes (through its LineGate) ---------------------------------------
    def caller_write(self, stream: TextIO, text: str) -> int:
        with self._lock:
            if self._closed:
                return stream.write(text)
            if "\n" in text and self._bars:
                # The caller's line ends: it goes above the bars, its next line below them.
                head, tail = text.rsplit("\n", 1)
                self.out.flush()
                stream.flush()
                self._open, shown = _last_frame(tail), self._open
                self._draw(above=shown + head + "\n")
                return len(text)
            n = stream.write(text)
            stream.flush()  # what the screen shows is what this object knows
            if "\n" in text:
                self._open = _last_frame(text.rsplit("\n", 1)[-1])
            else:
                self._open = _last_frame(self._open + text)
            self._up = len(self._bars) + self._rows(self._open, self._cols()) - 1
            return n

    def close(self) -> None:
        """The launch is over: bars still drawn are erased (their lines end as ordinary ones)."""
        with self._lock:
            if self._closed:
                return
            if self._bars:
                self._bars.clear()
                self._draw()
            self._closed = True

    # ---- drawing -----------------------------------------------------------------------------
    def _cols(self) -> int:
        try:
            cols = os.get_terminal_size(self.out.fileno()).columns
        except (OSError, ValueError, AttributeError):
            cols = 0
        return cols if cols > 0 else 80

    @staticmethod
    def _rows(text: str, cols: int) -> int:
        width = sum(map(_width, _ESCAPE.sub("", text)))
        return max(1, -(-width // cols))

    def _draw(self, above: str = "") -> None:
        """Erase from the first bar down, write `above` (lines that scroll up), then the bars,
        each clipped to one row, then the caller's open line. One write, so no flicker."""
        cols = self._cols()
        parts = [f"\x1b[{self._up}A" if self._up else "", "\r\x1b[J", above]
        parts += [_clip(text, cols - 1) + "\n" for _, text in sorted(self._bars.items())]
        parts.append(self._open)
        try:
            self.out.write("".join(parts))
            self.out.flush()
        except (OSError, ValueError):  # the terminal went away; nothing left to show it on
            self._closed = True
        self._up = len(self._bars) + self._rows(self._open, cols) - 1


def _width(ch: str) -> int:
    return 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1


def _clip(text: str, width: int) -> str:
    """`text` cut to `width` columns, so that a bar never wraps (which would break the count of
    rows to go back up); escape sequences (colours) are kept whole and take no column."""
    out, used, i = [], 0, 0
    while i < len(text):
        escape = _ESCAPE.match(text, i)
        if escape:
            out.append(escape.group())
            i = escape.end()
            continue
        used += _width(text[i])
        if used <= width:  # past the width only the escapes are kept (a colour's reset)
            out.append(text[i])
        i += 1
    return "".join(out)


def _last_frame(text: str) -> str:
    return text.rsplit("\r", 1)[-1]


def _in_kernel(stream: TextIO) -> bool:
    """The caller is an IPython kernel and `stream` is the kernel's own (not a %%capture or a
    redirect). IPython is looked up, not imported: not imported means not a kernel."""
    ipython = sys.modules.get("IPython")
    if ipython is None or not type(stream).__module__.startswith("ipykernel."):
        return False
    shell = ipython.get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def display_mode(stream: TextIO) -> str:
    """Where a child rank's displays and figures go (rank/displays.py): "cell" when the caller is a
    kernel writing to its cell, else "files" (a terminal, a pipe). `stream` may be a launch's
    gate (output.LineGate), whose renderer tells."""
    return "cell" if isinstance(getattr(stream, "live_bars", None), JupyterBars) or _in_kernel(stream) else "files"


def _terminal(stream: TextIO) -> int | None:
    """The terminal device `stream` writes to, or None (a pipe, a file, a dumb terminal)."""
    if os.environ.get("TERM") == "dumb":
        return None
    try:
        if not stream.isatty():
            return None
        return os.fstat(stream.fileno()).st_rdev
    except (AttributeError, OSError, ValueError):
        return None


def choose(stdout: TextIO, stderr: TextIO) -> tuple:
    """The renderers for the caller's stdout and stderr (None: whole lines only). One per place:
    the kernel's cell, or a terminal device both streams may share."""
    jupyter = None
    terminals: dict[int, TerminalBars] = {}
    chosen = []
    for stream in (stdout, stderr):
        if _in_kernel(stream):
            jupyter = jupyter or JupyterBars()
            chosen.append(jupyter)
            continue
        device = _terminal(stream)
        if device is None:
            chosen.append(None)
            continue
        if device not in terminals:
            terminals[device] = TerminalBars(stream)
        chosen.append(terminals[device])
    return tuple(chosen)
