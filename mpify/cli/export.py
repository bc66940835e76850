"""`mpify export NB --fn NAME [-o OUT] [--ddp] [--backend B] [--cell K] [--force] [--slurm [-n N]]`: a
standalone script, and with --slurm an sbatch script beside it that runs it with torchrun on every
node of a job (mpify.export.sbatch).

Thin on purpose: it slices, renders the payload plus main() (mpify.export.script), checks it
compiles, and writes it. It never overwrites a file without --force. The default output is
`<fn>_ddp.py` (with --ddp) or `<fn>.py` next to the notebook. `--call "train(model, 3)"` writes a
main() that makes that call (the names it uses are sliced in). User errors are one line
`mpify: error: ...` and exit code 2; translations the script makes are said on stderr as warnings,
and so is the notebook's own call of a target whose required parameters no option can spell.
"""
from __future__ import annotations

import os
import sys
from typing import Optional

import typer

from mpify.analysis import AnalysisError
from mpify.cli.common import CALL_HELP, CELL_HELP, FAITHFUL_HELP, fail, replay_options
from mpify.export.errors import ExportError, MissingArgumentsError, OutputExistsError
from mpify.export.sbatch import render_sbatch, sbatch_path


def export(
    notebook: str = typer.Argument(..., help="The notebook (.ipynb, or a .py file with `# %%` cells)."),
    fn: Optional[str] = typer.Option(None, "--fn", help="The function to export (what it needs is sliced out)."),
    call: Optional[str] = typer.Option(None, "--call", help=CALL_HELP),
    out: Optional[str] = typer.Option(None, "-o", "--output", help="The script to write (default: "
                                      "FN_ddp.py or FN.py next to the notebook)."),
    ddp: bool = typer.Option(False, "--ddp", help="Set up torch.distributed in main() (torchrun's env)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="Fix the backend (gloo or nccl) "
                                          "instead of choosing at run time. Needs --ddp."),
    cell: Optional[int] = typer.Option(None, "--cell", help=CELL_HELP),
    force: bool = typer.Option(False, "--force", help="Overwrite OUT if it exists."),
    faithful: bool = typer.Option(False, "--faithful", help=FAITHFUL_HELP),
    slurm: bool = typer.Option(False, "--slurm", help="Also write OUT's sbatch script beside it (OUT with "
                               ".sbatch for .py): torchrun on every node of the job."),
    nproc: int = typer.Option(1, "-n", "--nproc-per-node", help="With --slurm: ranks per node when "
                              "neither NPROC_PER_NODE nor the node's GPUs say."),
) -> None:
    """Write FN from NOTEBOOK, with what it needs, as a script runnable with python or torchrun."""
    from mpify.export.prepare import prepare

    try:
        if nproc < 1:
            raise ExportError(f"-n must be at least 1, got {nproc}")
        prep = prepare(notebook, fn, ddp=ddp, backend=backend, cell=cell, call=call, faithful=faithful)
        fn = prep.slice.target
        if out is None:
            out = os.path.join(os.path.dirname(notebook), f"{fn}_ddp.py" if ddp else f"{fn}.py")
        if os.path.isdir(out):
            raise ExportError(f"{out} is a directory; give a file name with -o")
        if os.path.exists(out) and not force:
            raise OutputExistsError(f"{out} exists; use --force to overwrite it")
        if slurm and os.path.exists(sbatch_path(out)) and not force:
            raise OutputExistsError(f"{sbatch_path(out)} exists; use --force to overwrite it")
    except (AnalysisError, ExportError) as e:
        fail(str(e))
    from mpify.export.script import render_script

    # Render again with the real file name, so the usage text in the header names it.
    payload = render_script(prep.slice, ddp=ddp, backend=backend, script=os.path.basename(out), call=prep.call)
    try:
        compile(payload.text, out, "exec")
    except SyntaxError as e:  # the analyzer only keeps statements that parse: a bug if it happens
        fail(f"the exported script does not compile (line {e.lineno}: {e.msg}); please report it")
    for w in prep.warnings + _object_parameters(prep):
        print(f"mpify: warning: {w}", file=sys.stderr)
    _write(out, payload.text)
    cells = ", ".join(map(str, prep.slice.cells_used))
    print(f"wrote {out}: `{fn}` and what it needs from cell(s) {cells} of {notebook}", file=sys.stderr)
    if slurm:
        wrapper = sbatch_path(out)
        _write(wrapper, render_sbatch(os.path.abspath(out), fn, notebook, sys.executable, nproc), mode=0o755)
        print(f"wrote {wrapper}: run it with `sbatch --wait -N NODES {wrapper}`", file=sys.stderr)


def _write(path: str, text: str, mode: int | None = None) -> None:
    """Whole or nothing: never a half-written file."""
    tmp = f"{path}.mpify-tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        fail(f"cannot write {path}: {e.strerror or e}")


def _object_parameters(prep) -> list[str]:
    """A warning when the script's options cannot replace what the notebook passes: required
    parameters without a type an option can spell (`model`), while the notebook calls the target."""
    from mpify.export.replay import check_required
    from mpify.export.signature import target_params

    if prep.call is not None:
        return []
    params = [p for p in target_params(prep.slice) or [] if p.kind == "literal"]
    try:
        check_required(prep.slice, params, set())
    except MissingArgumentsError as e:
        return [f"`{e.target}` needs {', '.join(f'`{m}`' for m in e.missing)}, which an option can only "
                f"give as a Python literal; cell {e.site.cell} passes the notebook's own: {e.site.source}; "
                f"`{' '.join(replay_options(e.site))}` exports that call"]
    return []
