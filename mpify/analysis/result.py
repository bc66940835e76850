"""The slice as its callers get it: `Slice`, its `SliceItem`s, and `render_source`, its text.

Why a module of its own: this is the analysis package's answer, what the export room and the CLI
read (the package docstring lists the fields they rely on), kept apart from how the slicer finds
it. `_q` is how every reason and message names a name.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from mpify.analysis.notebook import Notebook

__all__ = ["Slice", "SliceItem", "render_source", "ipython_standins", "IPYTHON_STANDINS"]

# Names IPython puts in a kernel's builtins, which a script lacks (issue 25: a slice that calls
# `display(..)` died with NameError outside the kernel). A slice that uses one gets a stand-in at
# its top: IPython's own where IPython is installed (`display` then prints, as IPython does
# without a kernel; `get_ipython()` is the running shell or None, as under plain python), else a
# few lines that do the same.
IPYTHON_STANDINS = {
    "display": ("try:\n"
                "    from IPython.display import display\n"
                "except ImportError:  # no IPython: print what a kernel would display\n"
                "    def display(*objs, **kwargs):\n"
                "        print(*objs)"),
    "get_ipython": ("try:\n"
                    "    from IPython import get_ipython\n"
                    "except ImportError:  # no IPython: no shell, as under plain python\n"
                    "    def get_ipython():\n"
                    "        return None"),
}
# What `mpify deps` and `mpify export` say about each.
STANDIN_NOTES = {
    "display": "IPython's `display` (a builtin in a kernel only): the script imports it from "
               "IPython.display, which prints outside a kernel, or prints where IPython is not installed",
    "get_ipython": "IPython's `get_ipython` (a builtin in a kernel only): the script imports it from "
                   "IPython, which gives None outside a kernel, or defines one that gives None",
}


@dataclass
class SliceItem:
    """One included top-level statement.

    cell: 1-based cell index; lineno/end_lineno: 1-based lines of the statement within the cell's
    original source (decorators included). source: the text to emit (the statement's original lines
    with the comment lines right above it, magics removed or translated); it starts at cell line
    `source_lineno` and keeps the cell's line structure, so line N of `source` is cell line
    `source_lineno + N - 1`. reasons: why it is in the slice. kind: 'function', 'class', 'lambda',
    'import', 'assignment', 'expression', 'statement' or 'writefile'. defines: names it binds.
    """

    cell: int
    lineno: int
    end_lineno: int
    source_lineno: int
    source: str
    reasons: list = field(default_factory=list)
    kind: str = "statement"
    defines: list = field(default_factory=list)
    index: int = 0

    def to_dict(self) -> dict:
        return {"cell": self.cell, "lineno": self.lineno, "end_lineno": self.end_lineno,
                "source_lineno": self.source_lineno, "kind": self.kind, "defines": self.defines,
                "reasons": self.reasons, "source": self.source}


@dataclass
class Slice:
    """What `target` needs as of the end of the notebook (or of cell `upto_cell`).

    items: included statements in notebook order. star_imports: modules of the star imports kept.
    unresolved: names nothing defines that a star import may supply. warnings: one string each,
    naming cell and line. cells_used: sorted cell indices of the items. target_kind: 'function',
    'class', 'lambda', 'variable' or 'import'. run_at: (cell, line, source) of the notebook's run
    of the target the slice is taken before (runpoint.py), or None.
    """

    notebook: Notebook
    target: str
    target_kind: str
    upto_cell: int | None
    items: list
    star_imports: list
    unresolved: list
    warnings: list
    cells_used: list
    run_at: tuple | None = None
    ipython: dict = field(default_factory=dict)
    # What `mpify deps --why` reads to explain a statement left out (whynot.py): the model, the
    # point, the statements that run the target, the closure's requests. Not part of to_dict.
    trace: object = field(default=None, repr=False, compare=False)

    def point(self) -> str:
        """Where the slice is taken, as `mpify deps` and `--why` say it."""
        if self.upto_cell:
            return f"the end of cell {self.upto_cell}"
        if self.run_at is not None:
            return f"cell {self.run_at[0]}, line {self.run_at[1]}, where the notebook runs it: {self.run_at[2]}"
        return "the end of the notebook"

    def notes(self) -> list:
        """One line per IPython builtin the slice uses, and the stand-in its script gets."""
        return [f"{where}: uses {STANDIN_NOTES[name]}" for name, where in sorted(self.ipython.items())]

    def to_dict(self) -> dict:
        """JSON-ready form (what `mpify deps --json` prints)."""
        run_at = None if self.run_at is None else dict(zip(("cell", "lineno", "source"), self.run_at))
        return {"notebook": self.notebook.path, "target": self.target,
                "target_kind": self.target_kind, "upto_cell": self.upto_cell, "run_at": run_at,
                "cells_used": self.cells_used, "items": [i.to_dict() for i in self.items],
                "star_imports": self.star_imports, "unresolved": self.unresolved,
                "ipython": dict(sorted(self.ipython.items())), "notes": self.notes(),
                "warnings": self.warnings}


def render_source(sl: Slice) -> str:
    """The items' sources joined in order, a `# cell K` comment over each cell's block.

    `from __future__` imports go first (Python requires it), then the stand-ins of the IPython
    builtins the slice uses (`ipython_standins`)."""
    future = [i for i in sl.items if i.kind == "import" and i.source.lstrip().startswith("from __future__")
              or "\nfrom __future__" in i.source]
    rest = [i for i in sl.items if i not in future]
    out = [i.source.rstrip("\n") for i in future]
    standins = ipython_standins(sl)
    if standins:
        out += ([""] if out else []) + standins
    prev = None
    for it in rest:
        if it.cell != prev:
            if out:
                out.append("")
            out.append(f"# cell {it.cell}")
            prev = it.cell
        out.append(it.source.rstrip("\n"))
    return "\n".join(out) + "\n"


def _q(name: str) -> str:
    return f"`{name}`"


def ipython_standins(sl) -> list:
    """The lines that define the IPython builtins `sl` uses outside a kernel (`IPYTHON_STANDINS`),
    under a comment that says why; [] when it uses none."""
    if not sl.ipython:
        return []
    names = sorted(sl.ipython)
    out = [f"# mpify: {' and '.join(f'`{n}`' for n in names)}: IPython's, a builtin in a kernel only"]
    for n in names:
        out += IPYTHON_STANDINS[n].split("\n")
    return out
