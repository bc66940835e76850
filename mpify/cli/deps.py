"""`mpify deps NB --fn NAME [--call EXPR] [--cell K] [--json] [--why CELL[:LINE]]`: what a function needs
from a notebook, and why; `--why` says why one statement (or every statement of a cell) is kept or left out.

Thin on purpose: it chooses the slice as `mpify run` and `mpify export` do (mpify.export.prepare:
`--call` slices in the names the call uses, and the notebook's last run of the target bounds the
slice unless `--cell` or `--call` says otherwise) and prints the report. A user error (bad
notebook, unknown function with "did you mean", a name nothing defines) is one line
`mpify: error: ...` on stderr and exit code 2.
"""
from __future__ import annotations

import json
from typing import Optional

import typer

from mpify.analysis import AnalysisError
from mpify.cli.common import CALL_HELP, CELL_HELP, FAITHFUL_HELP, fail
from mpify.export.errors import ExportError
from mpify.export.prepare import slice_target


def format_report(sl) -> str:
    """The human-readable report printed by `mpify deps`."""
    lines = [f"{sl.target} ({sl.target_kind}) in {sl.notebook.path}, as of {sl.point()}",
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
    notes = sl.notes()
    if notes:  # IPython's builtins: the script gets a stand-in for each
        lines += [""] + [f"note: {n}" for n in notes]
    if sl.warnings:
        lines += ["", "warnings:"] + [f"  {w}" for w in sl.warnings]
    return "\n".join(lines)


def deps(
    notebook: str = typer.Argument(..., help="The notebook (.ipynb, or a .py file with `# %%` cells)."),
    fn: Optional[str] = typer.Option(None, "--fn", help="The function (or class) to slice out."),
    call: Optional[str] = typer.Option(None, "--call", help=CALL_HELP),
    cell: Optional[int] = typer.Option(None, "--cell", help=CELL_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    faithful: bool = typer.Option(False, "--faithful", help=FAITHFUL_HELP),
    why: Optional[str] = typer.Option(None, "--why", "--why-not", metavar="CELL[:LINE]",
                                      help="Say why the statements of cell CELL (or the one at LINE) are kept or left out."),
) -> None:
    """Show the statements FN needs from NOTEBOOK, with the reason for each."""
    try:
        sl, _ = slice_target(notebook, fn, cell=cell, call=call, faithful=faithful)
    except (AnalysisError, ExportError) as e:
        fail(str(e))
    if why is not None:
        cell_text, _, line_text = why.partition(":")
        if not cell_text.isdigit() or (line_text and not line_text.isdigit()):
            fail(f"--why takes CELL or CELL:LINE (numbers, as `mpify deps` shows them), not {why!r}")
        from mpify.analysis.whynot import explain

        print("\n".join(explain(sl, int(cell_text), int(line_text) if line_text else None)))
        return
    if as_json:
        print(json.dumps(sl.to_dict(), indent=2))
    else:
        print(format_report(sl))
