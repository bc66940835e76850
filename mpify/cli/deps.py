"""`mpify deps NB --fn NAME [--cell K] [--json]`: show what a function needs from a notebook, and why.

Thin on purpose: it calls `mpify.analysis.slice_notebook` and prints the report. A user error (bad
notebook, unknown function with "did you mean", a name nothing defines) is one line
`mpify: error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from mpify.analysis import AnalysisError, slice_notebook
from mpify.cli.common import FAITHFUL_HELP


def _fail(msg: str) -> None:
    print(f"mpify: error: {msg}", file=sys.stderr)
    raise typer.Exit(2)


def format_report(sl) -> str:
    """The human-readable report printed by `mpify deps`."""
    upto = f"the end of cell {sl.upto_cell}" if sl.upto_cell else "the end of the notebook"
    lines = [f"{sl.target} ({sl.target_kind}) in {sl.notebook.path}, as of {upto}",
             f"{len(sl.items)} statement(s) from cell(s) {', '.join(map(str, sl.cells_used))}", ""]
    for it in sl.items:
        where = (f"cell {it.cell}, line {it.lineno}" if it.lineno == it.end_lineno
                 else f"cell {it.cell}, lines {it.lineno}-{it.end_lineno}")
        first = it.source.splitlines()[it.lineno - it.source_lineno] if it.source.strip() else ""
        more = " ..." if it.end_lineno > it.lineno else ""
        lines.append(f"{where}: {first.strip()}{more}")
        for r in it.reasons:
            lines.append(f"    - {r}")
    # A star import's names are listed once, in its own reason line ("star import supplies
    # `nn`, `torch`, ..."), not once per name and not again here.
    if sl.warnings:
        lines += ["", "warnings:"] + [f"  {w}" for w in sl.warnings]
    return "\n".join(lines)


def deps(
    notebook: str = typer.Argument(..., help="The notebook (.ipynb, or a .py file with `# %%` cells)."),
    fn: str = typer.Option(..., "--fn", help="The function (or class) to slice out."),
    cell: Optional[int] = typer.Option(None, "--cell", help="Slice as of the end of cell K "
                                       "(1-based, all cells counted, markdown included)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    faithful: bool = typer.Option(False, "--faithful", help=FAITHFUL_HELP),
) -> None:
    """Show the statements FN needs from NOTEBOOK, with the reason for each."""
    try:
        sl = slice_notebook(notebook, fn, upto_cell=cell, faithful=faithful)
    except AnalysisError as e:
        _fail(str(e))
        return
    if as_json:
        print(json.dumps(sl.to_dict(), indent=2))
    else:
        print(format_report(sl))
