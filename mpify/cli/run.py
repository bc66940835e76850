"""`mpify run NB --fn NAME [-n N] [--ddp] [--slurm] ... [-- target options]`: one notebook function on N
ranks (per node: --slurm runs the other nodes of a Slurm allocation too).

Thin on purpose: it prepares the slice (mpify.export.prepare), parses the target's options from its
signature (mpify.export.signature), runs it with ranch (this process is rank 0) and prints rank 0's
value (repr, or JSON with --json). `--call "train(model, 3)"` gives the whole call instead, with the
notebook's own objects as arguments. Exit codes: 0 done; 1 the target raised (its traceback, frames
named by notebook cell and line) or a rank died / timed out; 2 a user error (one line
`mpify: error: ...`; a missing parameter that the notebook's own call gives: up to three lines that
end in the `--call` replaying it); 130 interrupted. Every outcome removes the temp dir and leaves
no process.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional

import typer

from mpify.analysis import AnalysisError
from mpify.cli.common import CALL_HELP, CELL_HELP, FAITHFUL_HELP, fail, replay_options
from mpify.export.errors import ExportError, MissingArgumentsError

# What follows `--` goes to the target's own parser, so click keeps it as extra arguments.
CONTEXT_SETTINGS = {"allow_extra_args": True, "ignore_unknown_options": False}


def missing_lines(e: MissingArgumentsError, command: str, ddp: bool) -> list[str]:
    """The one to three lines for required parameters that the notebook's own call gives: the
    cell, then the options that replay it (-n the launch's process count; --ddp for mpify's DDP
    launchers), then a note where the launcher passed the process index."""
    site = e.site
    names = ", ".join(f"`{m}`" for m in e.missing)
    verb = "calls" if site.form == "call" else "launches"
    lines = [f"mpify: error: `{e.target}` needs {names}, which the command line does not give; "
             f"cell {site.cell} {verb} it: {site.source}"]
    options = replay_options(site)
    if command == "run" and site.nprocs is not None:
        options.append(f"-n {site.nprocs}" if site.nprocs.isdigit() else f"-n N (the launch used {site.nprocs})")
    if site.form.split(".")[-1] in ("torchddp_launch", "in_torchddp") and not ddp:
        options.append("--ddp")  # these launchers run fn under TorchDDPCtx
    lines.append(f"mpify: to replay that {'call' if site.form == 'call' else 'launch'}, use {' '.join(options)}")
    if site.rank_first:
        lines.append(f"mpify: {site.form} passes the process index first; the replay reads it from "
                     "LOCAL_RANK, which every rank has")
    return lines


def parse_show_ranks(text: str):
    """'all' -> None (every rank), 'none' -> (), '0,2' -> (0, 2)."""
    t = text.strip().lower()
    if t == "all":
        return None
    if t == "none":
        return ()
    try:
        ranks = tuple(int(x) for x in t.split(",") if x.strip())
    except ValueError:
        ranks = ()
    if not ranks or any(r < 0 for r in ranks):
        raise ExportError(f"--show-ranks takes all, none or rank numbers like 0,2; got {text!r}")
    return ranks


def to_jsonable(obj):
    """json.dumps default=: tensors and arrays as lists, other objects as their repr."""
    tolist = getattr(obj, "tolist", None)
    if callable(tolist):
        try:
            return tolist()
        except Exception:  # a tolist that needs arguments or fails: fall back to repr
            pass
    if isinstance(obj, (set, frozenset, tuple)):
        return list(obj)
    return repr(obj)


def run(
    ctx: typer.Context,
    notebook: str = typer.Argument(..., help="The notebook (.ipynb, or a .py file with `# %%` cells)."),
    fn: Optional[str] = typer.Option(None, "--fn", help="The function to run (what it needs is sliced out)."),
    call: Optional[str] = typer.Option(None, "--call", help=CALL_HELP),
    nprocs: int = typer.Option(1, "-n", "--nprocs", help="Ranks on this node."),
    ddp: bool = typer.Option(False, "--ddp", help="Run under torch.distributed (TorchDDPCtx)."),
    backend: Optional[str] = typer.Option(None, "--backend", help="gloo or nccl (default: nccl with "
                                          "one GPU per rank, else gloo). Needs --ddp."),
    cell: Optional[int] = typer.Option(None, "--cell", help=CELL_HELP),
    nnodes: Optional[int] = typer.Option(None, "--nnodes", help="Nodes in all (multi-node; with --slurm, "
                                         "default: the allocation's nodes)."),
    slurm: bool = typer.Option(False, "--slurm", help="Inside a Slurm allocation: this process is node 0 and "
                               "the other nodes' ranks start as srun steps. Outside one: salloc makes one of "
                               "--nnodes nodes and this command runs on its first node."),
    slurm_arg: List[str] = typer.Option([], "--slurm-arg", help="With --slurm outside an allocation: an option "
                                        "for salloc (--slurm-arg=--partition=gpu); repeatable."),
    node_rank: int = typer.Option(0, "--node-rank", help="This node's rank (0 hosts the rendezvous)."),
    master_addr: Optional[str] = typer.Option(None, "--master-addr", help="Node 0's address."),
    master_port: Optional[int] = typer.Option(None, "--master-port", help="Node 0's rendezvous port."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Stop every rank after S seconds."),
    show_ranks: str = typer.Option("all", "--show-ranks", help="Whose output to show: all, none, "
                                   "or ranks like 0,2."),
    as_json: bool = typer.Option(False, "--json", help="Print rank 0's value as JSON."),
    faithful: bool = typer.Option(False, "--faithful", help=FAITHFUL_HELP),
) -> None:
    """Run FN from NOTEBOOK on N ranks and print rank 0's value. Target options go after `--`
    (`-- --lr 0.1`; `-- --help` lists them), or the whole call with --call "train(model, 3)"."""
    from mpify.engine.rendezvous import PortInUseError
    from mpify.engine.slurm.agents import SlurmLaunchError
    from mpify.export.replay import check_required, given_options
    from mpify.export.runner import prepare, run_prepared
    from mpify.export.signature import parse_target_args, target_description, target_params

    try:
        try:
            show = parse_show_ranks(show_ranks)
            if slurm and node_rank:
                raise ExportError("--slurm runs this process as node 0: drop --node-rank")
            _check_launch_options(nprocs, 1 if nnodes is None else nnodes, node_rank, master_port, timeout)
            if call is not None and ctx.args:
                raise ExportError(f"--call gives all the arguments of the call; drop the options after "
                                  f"-- ({' '.join(ctx.args)}) or put them in the call")
            prep = prepare(notebook, fn, ddp=ddp, backend=backend, cell=cell, call=call, faithful=faithful)
            kwargs = {}
            if call is None:
                params = target_params(prep.slice)
                argv = list(ctx.args)
                if not {"-h", "--help"} & set(argv):
                    check_required(prep.slice, params, given_options(params or [], argv))
                prog = f"mpify run {notebook} --fn {fn} --"
                try:
                    kwargs = parse_target_args(params, argv, prog, target_description(prep.slice), fn)
                except SystemExit as e:  # `-- --help` printed the options
                    raise typer.Exit(e.code or 0)
        except MissingArgumentsError as e:
            print("\n".join(missing_lines(e, "run", ddp)), file=sys.stderr)
            raise typer.Exit(2)
        except (AnalysisError, ExportError) as e:
            fail(str(e))
        for w in prep.warnings:
            print(f"mpify: warning: {w}", file=sys.stderr)
        if slurm and "SLURM_JOB_ID" not in os.environ:
            if nnodes is None:
                fail("--slurm outside an allocation needs --nnodes (how many nodes to ask Slurm for)")
            from mpify.cli.submit import inner_command, submit

            options = _options(fn, call, nprocs, ddp, backend, cell, nnodes, master_port, timeout, show_ranks,
                               as_json, faithful)
            raise typer.Exit(submit(inner_command(notebook, options, list(ctx.args)), nnodes, slurm_arg,
                                    fn or "call"))
        if slurm_arg:
            fail("--slurm-arg goes with --slurm outside an allocation (inside one, Slurm's options are the "
                 "allocation's)")
        from mpify.engine.start import pool

        pool.single_launch()  # no forkserver for launches to come: this command makes one
        try:
            value = run_prepared(prep, nprocs, kwargs=kwargs, timeout=timeout, show_ranks=show,
                                 nnodes=nnodes, node_rank=node_rank, master_addr=master_addr,
                                 master_port=master_port, launcher="slurm" if slurm else None)
        except (AnalysisError, ExportError, PortInUseError, SlurmLaunchError) as e:
            fail(str(e))
        except typer.Exit:
            raise
        except Exception as e:
            _print_failure(e)
            raise typer.Exit(1)
    except KeyboardInterrupt:
        print("mpify: interrupted", file=sys.stderr)
        raise typer.Exit(130)
    sys.stdout.flush()
    if node_rank != 0:  # the value printed is global rank 0's, as the exported script does
        return
    if as_json:
        print(json.dumps(value, default=to_jsonable))
    else:
        print(repr(value))


def _options(fn, call, nprocs, ddp, backend, cell, nnodes, master_port, timeout, show_ranks, as_json,
             faithful) -> list[str]:
    """The options given, spelled again for the `mpify run` that runs inside the allocation."""
    out = ["-n", str(nprocs), "--nnodes", str(nnodes), "--show-ranks", show_ranks]
    for flag, value in (("--fn", fn), ("--call", call), ("--backend", backend), ("--cell", cell),
                        ("--master-port", master_port), ("--timeout", timeout)):
        if value is not None:
            out += [flag, str(value)]
    return out + [flag for flag, on in (("--ddp", ddp), ("--json", as_json), ("--faithful", faithful)) if on]


def _check_launch_options(nprocs, nnodes, node_rank, master_port, timeout) -> None:
    """ranch's own checks, made here so that they read as user errors and nothing starts."""
    if nprocs < 1:
        raise ExportError(f"-n must be at least 1, got {nprocs}")
    if nnodes < 1:
        raise ExportError(f"--nnodes must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise ExportError(f"--node-rank must be between 0 and {nnodes - 1} (--nnodes {nnodes}), got {node_rank}")
    if master_port is not None and not 1 <= master_port <= 65535:
        raise ExportError(f"--master-port must be between 1 and 65535, got {master_port}")
    if timeout is not None and timeout <= 0:
        raise ExportError(f"--timeout must be a positive number of seconds, got {timeout}")


def _print_failure(e: BaseException) -> None:
    """The rank's traceback, frames named by notebook cell (see mpify.export.tracebacks)."""
    from mpify.engine.errors import RemoteTraceback

    sys.stdout.flush()
    cause = e.__cause__
    if isinstance(cause, RemoteTraceback):
        text = cause.text
    else:  # RankDiedError, LaunchTimeoutError: a one-line account, no frames of the user's
        text = f"{type(e).__name__}: {e}\n"
    sys.stderr.write(text if text.endswith("\n") else text + "\n")
    sys.stderr.flush()
