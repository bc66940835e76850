"""`%load_ext mpify`: a live world driven from notebook cells, thin over `World`.

    %mpify start 4 --ddp        ranks 1..3 start and join the kernel (rank 0) in one process group
    %%ranch                     the cell on every rank; rank 0 runs it as the kernel runs any cell
    %%ranch --ranks 1,2         the cell on some ranks only
    %mpify status | stop | auto on | auto off

Rank 0 runs the cell in the kernel's own namespace, through IPython's transformations and its
compile cache, so its last expression is the cell's `Out`, rich values display, plots show,
tracebacks point at the cell's lines and `%debug` works after an error. The other ranks run the
same transformed source in namespaces of their own (plain Python: IPython's magics and `!` exist
only in rank 0); their output and their last expression's value appear live, `[rank N]`-prefixed.
"""
from __future__ import annotations

import argparse
import shlex
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

# World, and the torch part's modules that register themselves with the engine when imported, as
# the public surface loads them with its names (mpify/__init__.py): ctx.py makes `ddp=True` mean
# TorchDDPCtx (and imports store.py, the hosted store), codec.py sends tensors through shared
# memory. Never through `mpify` itself, the package init.
from mpify.engine.world.rank import run_source
from mpify.engine.world.world import World
from mpify.torchddp import codec, ctx

_REGISTERED = (codec, ctx)  # imported for what importing them does


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a UsageError is shown as one line, not a traceback
        raise UsageError(f"{self.prog}: {message}")


def _start_parser() -> _Parser:
    parser = _Parser(prog="%mpify start", add_help=False)
    parser.add_argument("nprocs", type=int)
    parser.add_argument("--ddp", action="store_true", help="enter TorchDDPCtx once in every rank")
    parser.add_argument("--backend", choices=("gloo", "nccl"), default=None)
    parser.add_argument("--slurm", action="store_true",
                        help="inside a Slurm allocation: the other nodes' ranks start through srun")
    parser.add_argument("--nnodes", type=int, default=None,
                        help="with --slurm: how many of the allocation's nodes (all by default)")
    return parser


def parse_ranks(text: str) -> list[int]:
    """'1,2' or '0 3' or '[0, 2]' -> [1, 2] / [0, 3] / [0, 2]."""
    try:
        return [int(part) for part in text.replace("[", " ").replace("]", " ").replace(",", " ").split()]
    except ValueError:
        raise UsageError(f"%%ranch --ranks takes rank numbers such as 1,2; got {text!r}") from None


@magics_class
class WorldMagics(Magics):
    def __init__(self, shell: Any):
        super().__init__(shell)
        self.world: World | None = None
        self.auto = False
        self._in_cell = False  # while %%ranch transforms its own cell, auto mode must not wrap it again

    # ---- %mpify ------------------------------------------------------------------------------
    @line_magic
    def mpify(self, line: str) -> Any:
        """%mpify start N [--ddp] [--backend gloo|nccl] [--slurm [--nnodes K]] | stop | status | auto on|off"""
        words = shlex.split(line, comments=True)  # `%mpify start 4  # why`: the comment is not an argument
        if not words:
            raise UsageError("usage: %mpify start N [--ddp] [--backend gloo|nccl] [--slurm [--nnodes K]] | stop | status | auto on|off")
        command, rest = words[0], words[1:]
        if command == "start":
            args = _start_parser().parse_args(rest)
            if self.world is not None and not self.world.closed:
                self.world.close()
                print("mpify: the previous world was closed")
            self.world = None
            if args.nnodes is not None and not args.slurm:
                raise UsageError("%mpify start: --nnodes goes with --slurm")
            self.world = World(args.nprocs, ddp=args.ddp, backend=args.backend, nnodes=args.nnodes,
                               launcher="slurm" if args.slurm else None)
            across = f" on {self.world.topo.nnodes} nodes ({args.nprocs} each)" if args.slurm else ""
            print(f"mpify: a world of {self.world.world_size} ranks is up{across}; this kernel is rank 0"
                  + (" (DDP, one process group)" if args.ddp else ""))
            return None
        if command == "stop":
            if self.world is not None:
                self.world.close()
                self.world = None
                print("mpify: the world is closed")
            return None
        if command == "status":
            self._print_status()
            return None
        if command == "auto":
            if rest not in (["on"], ["off"]):
                raise UsageError("usage: %mpify auto on|off")
            self._set_auto(rest[0] == "on")
            return None
        raise UsageError(f"%mpify: unknown command {command!r} (start, stop, status, auto)")

    def _print_status(self) -> None:
        if self.world is None:
            print("mpify: no world (start one with %mpify start N)")
            return
        if self.world.closed:
            print(f"mpify: the world is closed ({self.world.lost_reason or 'stopped'})")
            return
        rows = self.world.status()
        nodes = any("node" in row for row in rows)  # a Slurm world: each rank's node
        print(f"{'rank':>4} " + (f"{'node':>8} " if nodes else "")
              + f"{'pid':>8} {'alive':>5} {'device':>8} {'rss MB':>8} {'cuda MB':>8}")
        for row in rows:
            print(f"{row['rank']:>4} " + (f"{row.get('node', '?'):>8} " if nodes else "")
                  + f"{row.get('pid', '?'):>8} {str(row['alive']):>5} {row.get('device', '?'):>8} "
                  f"{row.get('rss_mb', '?'):>8} {row.get('cuda_mb', '-'):>8}")

    def _set_auto(self, on: bool) -> None:
        cleanup = self.shell.input_transformers_cleanup
        if on and self._auto_transform not in cleanup:
            cleanup.append(self._auto_transform)
        if not on and self._auto_transform in cleanup:
            cleanup.remove(self._auto_transform)
        self.auto = on
        print(f"mpify: every cell runs on every rank: {'on' if on else 'off'}")

    def _auto_transform(self, lines: list[str]) -> list[str]:
        """In auto mode, a cell without a cell magic or an %mpify line of its own becomes %%ranch."""
        if self._in_cell or not lines or not "".join(lines).strip():
            return lines
        first = lines[0].lstrip()
        if first.startswith(("%%", "%mpify", "%load_ext", "%unload_ext")):
            return lines
        return ["%%ranch\n"] + lines

    # ---- %%ranch -----------------------------------------------------------------------------
    @cell_magic
    def ranch(self, line: str, cell: str) -> Any:
        """Run the cell on every rank of the world (or those of --ranks 1,2)."""
        __tracebackhide__ = True  # noqa: F841 (IPython leaves this frame out of tracebacks)
        words = shlex.split(line, comments=True)
        ranks = None
        if words:
            if words[0] in ("--ranks", "-r") and len(words) >= 2:
                ranks = parse_ranks(" ".join(words[1:]))
            elif words[0].startswith("--ranks="):
                ranks = parse_ranks(words[0].split("=", 1)[1] + " " + " ".join(words[1:]))
            else:
                raise UsageError("usage: %%ranch [--ranks 1,2]")
        if self.world is None:
            raise UsageError("no world: start one with %mpify start N [--ddp]")
        shell = self.shell
        self._in_cell = True
        try:
            source = shell.transform_cell(cell)
        finally:
            self._in_cell = False
        # IPython's compile cache holds the source under a name that tracebacks and %debug read.
        filename = shell.compile.cache(source, shell.execution_count, raw_code=cell)
        value = self.world.exec(source, ranks=ranks, filename=filename,
                                runner=lambda: run_source(source, shell.user_ns, filename))
        if cell.rstrip().endswith(";"):  # as IPython does: a trailing ';' hides the value
            return None
        return value


_loaded: dict[int, WorldMagics] = {}


def load(ipython: Any) -> None:
    magics = WorldMagics(ipython)
    ipython.register_magics(magics)
    _loaded[id(ipython)] = magics


def unload(ipython: Any) -> None:
    magics = _loaded.pop(id(ipython), None)
    if magics is None:
        return
    if magics.auto:
        magics._set_auto(False)
    if magics.world is not None:
        magics.world.close()
