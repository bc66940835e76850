"""Tracebacks that name notebook cells: `File "nb.ipynb", cell 5, line 8, in train`.

Why rewrite text: a rank's traceback reaches the caller as text (RemoteTraceback.text, formatted
in the rank while the payload file existed, so the source line under each frame is right), and the
caller rank's own exception is formatted here the same way. Rewriting the `File "<payload>", line N`
lines through the payload's line map is all it takes; the source lines are the notebook's own text,
so they stay right.

mpify's own frames (engine, ctx) are dropped when the traceback also has notebook frames: they say
how the function was called, which the user did not write. Without notebook frames (the failure is
in DDP setup, say) they are kept, since they are then the only clue.

After the payload's temp dir is gone, Python may still print the rebuilt traceback objects (Jupyter
does): `keep_source` leaves the payload text in linecache so those frames show their lines too.
"""
from __future__ import annotations

import linecache
import os
import re
import traceback

from mpify.engine.errors import RemoteTraceback

__all__ = ["rewrite_traceback", "mapped_traceback", "attach_mapped_traceback", "keep_source"]

_FRAME = re.compile(r'^(?P<indent>\s*)File "(?P<file>[^"]+)", line (?P<line>\d+)(?P<rest>.*)$')
_MPIFY_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # mpify/


def rewrite_traceback(text: str, payload_path: str, line_map: dict, label: str) -> str:
    """Map the payload's frames in `text` to notebook cells; drop mpify's frames (see above)."""
    lines = text.splitlines(keepends=True)
    has_payload = any((m := _FRAME.match(ln)) and m["file"] == payload_path for ln in lines)
    out, skipping = [], False
    for ln in lines:
        m = _FRAME.match(ln)
        if m:
            f = m["file"]
            skipping = has_payload and f.startswith(_MPIFY_DIR)
            if skipping:
                continue
            if f == payload_path and int(m["line"]) in line_map:
                cell, cell_line = line_map[int(m["line"])]
                nl = "\n" if ln.endswith("\n") else ""
                if isinstance(cell, str):  # a line the user typed elsewhere: ("--call", 1)
                    ln = f'{m["indent"]}File "{cell}", line {cell_line}{m["rest"]}{nl}'
                else:
                    ln = f'{m["indent"]}File "{label}", cell {cell}, line {cell_line}{m["rest"]}{nl}'
            out.append(ln)
            continue
        if skipping and ln.startswith("    "):  # the skipped frame's source and caret lines
            continue
        skipping = False
        out.append(ln)
    return "".join(out)


def mapped_traceback(exc: BaseException, payload_path: str, line_map: dict, label: str) -> str:
    """The whole traceback of `exc` as the user should read it, notes (rank numbers) included."""
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):  # it came from a child rank, formatted there
        text = cause.text
        if not text.endswith("\n"):
            text += "\n"
        for note in getattr(exc, "__notes__", ()) or ():
            if note not in text:
                text += f"{note}\n"
    else:  # raised right here (the caller is rank 0, or the payload's import failed)
        text = "".join(traceback.format_exception(exc))
    return rewrite_traceback(text, payload_path, line_map, label)


def attach_mapped_traceback(exc: BaseException, payload_path: str, line_map: dict, label: str) -> str:
    """Put the mapped text in exc's RemoteTraceback cause (created for a caller-rank error) so a
    Python caller that prints the exception sees notebook cells. Returns the text."""
    text = mapped_traceback(exc, payload_path, line_map, label)
    cause = exc.__cause__
    if isinstance(cause, RemoteTraceback):
        cause.text = text
        cause.args = (text,)
    else:
        try:
            exc.__cause__ = RemoteTraceback(text)
        except (AttributeError, TypeError):  # an exception type that forbids it: keep it as is
            pass
    return text


def keep_source(path: str, text: str) -> None:
    """Keep `text` as the source of `path` in linecache after the file is deleted (mtime None
    marks an entry checkcache() must not drop)."""
    linecache.cache[path] = (len(text), None, text.splitlines(keepends=True), path)
