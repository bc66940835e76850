"""Reading notebooks: .ipynb through nbformat, and Python files with `# %%` cells.

Why: everything after this module sees one shape, a `Notebook` with numbered `Cell`s, whatever the
file was. Cell numbers are what a user counts in JupyterLab: the 1-based position among ALL cells,
markdown included, so "cell 7" in a report is the seventh cell on screen. Lines are 1-based within
the cell. For a `# %%` Python file, cell K is the K-th block; text before the first `# %%` marker
is a cell of its own only when it holds something other than blank lines.

Every way a file can fail to be a notebook becomes a `NotebookError` with one line of text.
"""
from __future__ import annotations

import json
import os
import re
import warnings as warnings_module
from dataclasses import dataclass, field

from mpify.analysis.diskcache import DiskCache
from mpify.analysis.errors import NotebookError

__all__ = ["Cell", "Notebook", "load_notebook"]


@dataclass
class Cell:
    """One notebook cell.

    index: 1-based position among all cells (markdown included).
    kind: 'code', 'markdown' or 'raw'.
    source: the cell's original text.
    execution_count: as saved in the notebook (None if never run, or for `# %%` files).
    raised: True when the saved outputs include an error (the cell raised when it last ran).
    """

    index: int
    kind: str
    source: str
    execution_count: int | None = None
    raised: bool = False


@dataclass
class Notebook:
    """A notebook read from `path`; `cells` in document order, `cells[i].index == i + 1`.
    warnings: what reading it tolerated (a schema violation Jupyter accepts), one line each."""

    path: str
    cells: list[Cell] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def code_cells(self) -> list[Cell]:
        return [c for c in self.cells if c.kind == "code"]


def load_notebook(path) -> Notebook:
    """Read an .ipynb (nbformat v4; older versions upgraded) or a `# %%` Python file.

    Raises NotebookError (one line) for a missing file, a file that is not JSON, or JSON that is not
    a notebook. A notebook that breaks the schema but can be read is read (`Notebook.warnings`).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise NotebookError(path, "no such file")
    if os.path.isdir(path):
        raise NotebookError(path, "is a directory, not a notebook")
    if path.endswith(".py"):
        return _load_percent_script(path)
    return _load_ipynb(path)


# Notebooks nbformat has read before: absolute path -> [size, mtime_ns, [schema message] or []].
# Why: importing nbformat and validating against the schema took 0.2 s of a 0.3 s `mpify export`
# (jsonschema's import, then the validator's compilation), for a notebook that had not changed
# since the last command. A v4 notebook whose very version (size, mtime) nbformat accepted is read
# from its JSON directly, with the warning nbformat gave then; anything else goes through nbformat.
_READ_BEFORE = DiskCache("notebooks-v1.json")


def _load_ipynb(path: str) -> Notebook:
    try:
        st = os.stat(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise NotebookError(path, f"cannot be read ({e.__class__.__name__}: {e})") from None
    try:
        raw = json.loads(text)
    except ValueError as e:
        raise NotebookError(path, f"is not JSON ({e})") from None
    # nbformat's own messages for a JSON file that is not a notebook are about "version 1 to 2";
    # check the obvious shape first so the user reads what is wrong.
    if not isinstance(raw, dict) or "nbformat" not in raw:
        raise NotebookError(path, "is JSON but not a notebook (no 'nbformat' key)")
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    known = _READ_BEFORE.get(*key) if raw.get("nbformat") == 4 else None
    if isinstance(known, list) and len(known) <= 1 and all(isinstance(w, str) for w in known):
        try:
            return Notebook(path, _cells(raw["cells"]), [_schema_warning(path, w) for w in known])
        except (KeyError, TypeError, AttributeError):  # never trusted: read it as below
            pass
    cells, message = _read_with_nbformat(path, text)
    if raw.get("nbformat") == 4:  # older versions are upgraded by nbformat every time
        _READ_BEFORE.put(*key, [] if message is None else [message])
        _READ_BEFORE.flush()
    return Notebook(path, cells, [] if message is None else [_schema_warning(path, message)])


def _read_with_nbformat(path: str, text: str) -> tuple:
    """(cells, the schema violation nbformat tolerated or None)."""
    import nbformat

    # Read as Jupyter reads: a schema violation that Jupyter tolerates (stream outputs carrying a
    # `metadata` key, written by some exporters; issue 11) is one warning line, not a refusal.
    # `capture_validation_error` takes the error instead of nbformat logging it on stderr.
    captured: dict = {}
    try:
        with warnings_module.catch_warnings():
            # nbformat warns (Python warning, on stderr) about cells without ids, which it repairs.
            warnings_module.simplefilter("ignore")
            nb = nbformat.reads(text, as_version=4, capture_validation_error=captured)
    except Exception as e:  # nbformat raises KeyError, ValueError... on what it cannot convert
        raise NotebookError(path, f"is not a valid notebook ({_first_line(e)})") from None
    return _cells(nb.cells), (_first_line(captured["ValidationError"]) if "ValidationError" in captured else None)


def _schema_warning(path: str, message: str) -> str:
    return f"{path}: does not follow the notebook schema ({message}); read as Jupyter reads it"


def _cells(cells) -> list:
    """Cells from nbformat's nodes or from the notebook's JSON (lists of lines joined, as
    nbformat joins them)."""
    out = []
    for i, c in enumerate(cells, start=1):
        kind = c.get("cell_type", "raw")
        src = c.get("source", "")
        if isinstance(src, list):
            src = "".join(src)
        if not isinstance(src, str):
            raise TypeError("cell source")
        raised = any(o.get("output_type") == "error" for o in c.get("outputs", []) or [])
        out.append(Cell(i, kind, src, c.get("execution_count") if kind == "code" else None, raised))
    return out


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else e.__class__.__name__


_MARKER = re.compile(r"^#\s*%%(.*)$")


def _load_percent_script(path: str) -> Notebook:
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
    except (OSError, UnicodeDecodeError) as e:
        raise NotebookError(path, f"cannot be read ({e.__class__.__name__}: {e})") from None
    blocks: list[tuple[str, list[str]]] = []
    kind, cur = "code", []
    seen_marker = False
    for line in lines:
        m = _MARKER.match(line)
        if m:
            # Text before the first marker is a cell only if it is more than blank lines.
            if seen_marker or any(s.strip() for s in cur):
                blocks.append((kind, cur))
            seen_marker = True
            rest = m.group(1)
            kind = "markdown" if "[markdown]" in rest or "[md]" in rest else (
                "raw" if "[raw]" in rest else "code")
            cur = []
        else:
            cur.append(line)
    if seen_marker or any(s.strip() for s in cur):
        blocks.append((kind, cur))
    if not seen_marker and not blocks:
        raise NotebookError(path, "is empty")
    cells = []
    for i, (kind, body) in enumerate(blocks, start=1):
        src = "".join(body)
        if kind == "markdown":  # jupytext writes markdown as comment lines
            src = "".join(re.sub(r"^# ?", "", ln) for ln in body)
        cells.append(Cell(i, kind, src, None, False))
    return Notebook(path, cells)
