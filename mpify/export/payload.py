"""Slice -> the payload: a Python module's text, and a map from its lines back to notebook cells.

Why one renderer: `mpify run` imports exactly the text `mpify export` writes, so what ran is what
the user can read. The text is the slice's own source (comments, decorators, compound statements
whole, magics removed or translated by the analyzer), in notebook order, under a header docstring
naming the notebook, the target and the cells used, with a `# ---- cell K ----` comment over each
cell's block. Every emitted source line is recorded in `line_map` (payload line -> (cell, cell
line)), which is how tracebacks say "cell 5, line 8" (see tracebacks.py).

IPython's builtins the slice uses (`display`, `get_ipython`) get a stand-in under the header (see
mpify.analysis.result.IPYTHON_STANDINS), and a note says so.

Lines the analyzer translated (`x = !ls` -> subprocess) are said in a comment under the cell's
header; lines that have no translation (`x = %timeit -o f()` bound to None, `%run`) make the export
fail with UntranslatableError naming the cell and line: a script that silently differs from the
notebook is worse than no script.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mpify.analysis.magics import translate_cell
from mpify.analysis.result import ipython_standins
from mpify.export.errors import UntranslatableError

__all__ = ["Payload", "render_payload", "translation_notes"]


@dataclass
class Payload:
    """text: the module source. line_map: 1-based payload line -> (cell, 1-based cell line), or
    ("--call", 1) for the line that makes a --call.
    notebook: the notebook's path as the user gave it (what tracebacks show). notes: one line per
    translated line, "cell K, line L: what was done". call_function: set by render_script when a
    --call was given: the name of the module-level function that makes that call."""

    text: str
    line_map: dict
    notebook: str
    target: str
    cells: list
    notes: list = field(default_factory=list)
    call_function: str | None = None  # the script's function that makes a --call (script.py)


def _docstring_safe(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"""', '\\"\\"\\"')


def translation_notes(sl) -> dict:
    """{(cell, line): note} for the slice's translated lines. Raises UntranslatableError for a line
    the slice needs that has no faithful Python translation."""
    notes = {}
    cells = {c.index: c for c in sl.notebook.cells}
    by_cell: dict = {}
    for it in sl.items:
        by_cell.setdefault(it.cell, []).append(it)
    for k, items in by_cell.items():
        pyc = translate_cell(cells[k].source)  # the analyzer's own translation, to learn what it did
        for it in items:
            if it.kind == "writefile":  # the whole cell became one Python statement
                notes[(k, 1)] = (f"`%%writefile {pyc.file_write.path if pyc.file_write else ''}` "
                                 "translated to a Python statement that writes the file")
                continue
            for ln in range(it.lineno, it.end_lineno + 1):
                if ln in pyc.opaque:
                    raise UntranslatableError(
                        k, ln, f"{sl.notebook.path}: cell {k}, line {ln}: {pyc.opaque[ln]}, and "
                               f"`{sl.target}` needs it; it cannot be exported: replace it with Python "
                               "(an import or an assignment)")
                note = pyc.notes.get(ln)
                if note is None:
                    continue
                if "cannot be translated" in note:
                    raise UntranslatableError(
                        k, ln, f"{sl.notebook.path}: cell {k}, line {ln}: {note.split(';')[0]}, and "
                               f"`{sl.target}` needs it; compute the value in Python instead")
                notes[(k, ln)] = note
    return notes


def render_payload(sl, usage: list[str] | tuple = ()) -> Payload:
    """Render slice `sl` as module text. `usage`: extra header lines (how to run the script)."""
    notes = translation_notes(sl)
    nb = sl.notebook.path
    cells = sl.cells_used
    head = [f'"""`{sl.target}` from {nb}, exported by mpify.',
            "",
            f"Cells used: {', '.join(map(str, cells))} (numbered as in Jupyter: all cells, markdown "
            "included)."]
    if usage:
        head += [""] + list(usage)
    head.append('"""')
    lines = [_docstring_safe(h) if 0 < i < len(head) - 1 else h for i, h in enumerate(head)]
    lines[0] = '"""' + _docstring_safe(lines[0][3:])
    line_map: dict = {}

    # `from __future__` imports must come first after the docstring (Python requires it); then
    # the stand-ins of the IPython builtins the slice uses (`display`, `get_ipython`).
    future = [it for it in sl.items if it.kind == "import" and "from __future__" in it.source]
    rest = [it for it in sl.items if it not in future]
    standins = ipython_standins(sl)
    prev = None
    for it in future + rest:
        if standins and it not in future:
            lines += ["", ""] + standins
            standins = None
        if prev is None or it.cell != prev.cell or (prev in future) != (it in future):
            lines += ["", "", f"# ---- cell {it.cell} ----"]
            for (c, ln), note in sorted(notes.items()):
                if c == it.cell and (prev is None or prev.cell != it.cell):
                    lines.append(f"# mpify: line {ln}: {note}")
        else:
            gap = it.source_lineno - prev.end_lineno - 1
            if gap > 0:  # statements of the cell left out between them: keep the cell's spacing
                lines += [""] * min(2, max(1, _blank_run(sl, it)))
        for i, text in enumerate(it.source.rstrip("\n").split("\n")):
            lines.append(text)
            line_map[len(lines)] = (it.cell, it.source_lineno + i)
        prev = it
    if standins:  # (a slice of `from __future__` imports only)
        lines += ["", ""] + standins
    text = "\n".join(lines) + "\n"
    note_lines = [f"cell {c}, line {ln}: {n}" for (c, ln), n in sorted(notes.items())] + sl.notes()
    return Payload(text, line_map, nb, sl.target, cells, note_lines)


def _blank_run(sl, it) -> int:
    """How many blank lines the cell has right above item `it` (its own comment lines included)."""
    src = sl.notebook.cells[it.cell - 1].source.split("\n")
    n, k = 0, it.source_lineno - 2
    while k >= 0 and not src[k].strip():
        n, k = n + 1, k - 1
    return n
