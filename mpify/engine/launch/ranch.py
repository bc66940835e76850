"""ranch: run `fn(*args, **kwargs)` on N ranked processes, the caller being one of them.

This module is the call: its arguments checked, what travels pickled, the caller's streams and
signals taken for the launch's length, and the outcome. The launch itself, every process and
thread it starts and how they are stopped, is a `Launch` (supervisor.py).
"""
from __future__ import annotations

import sys
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator

from mpify.engine import rendezvous
from mpify.engine.args import serialize, shm
from mpify.engine.env import Topology
from mpify.engine.errors import LaunchBusyError
from mpify.engine.launch.interrupts import InterruptGuard
from mpify.engine.launch.supervisor import Launch
from mpify.engine.output.lines import LineGate, close_gates, gates, rank_filter
from mpify.engine.start import pool


@contextmanager
def _gated(out: LineGate, err: LineGate, caller_prints: bool) -> Iterator[None]:
    """While the caller runs a rank, its sys.stdout/sys.stderr go through the gates (whose
    `write_lines` the ranks' forwarders use); afterwards they are put back, unless fn itself
    replaced them meanwhile."""
    if not caller_prints:
        yield
        return
    before = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = out, err
    try:
        yield
    finally:
        if sys.stdout is out:
            sys.stdout = before[0]
        if sys.stderr is err:
            sys.stderr = before[1]


@contextmanager
def _closing(*streams: LineGate) -> Iterator[None]:
    """The gates' live renderers end with the launch (after its teardown)."""
    try:
        yield
    finally:
        close_gates(*streams)


@contextmanager
def _removing(writer: shm.ShmWriter) -> Iterator[None]:
    try:
        yield
    finally:
        writer.cleanup()


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def _user_globals() -> dict:
    """The globals of the first frame outside mpify: the notebook or script that launched."""
    frame = sys._getframe(1)
    while frame is not None and str(frame.f_globals.get("__name__", "")).startswith("mpify."):
        frame = frame.f_back
    return frame.f_globals if frame is not None else {}


def _needed_globals(need: str | Iterable[str], frame_globals: dict) -> dict:
    names = need.split() if isinstance(need, str) else list(need)
    missing = [n for n in names if n not in frame_globals]
    if missing:
        raise NameError(f"need names {', '.join(missing)}, which the caller has not defined")
    return {n: frame_globals[n] for n in names}


_launching: dict[int, int] = {}  # thread ident -> how many launches it is inside (nested ones count)
_launching_lock = threading.Lock()


@contextmanager
def _only_this_thread() -> Iterator[None]:
    """Refuse a launch while another thread is inside one (see LaunchBusyError)."""
    me = threading.get_ident()
    with _launching_lock:
        other = next((t for t in _launching if t != me), None)
        if other is not None:
            name = next((t.name for t in threading.enumerate() if t.ident == other), f"thread {other}")
            raise LaunchBusyError(f"a launch is already running in this process, from thread {name!r}; "
                                  "launches share os.environ, the working directory and the signal "
                                  "handlers, so wait for it to return")
        _launching[me] = _launching.get(me, 0) + 1
    try:
        yield
    finally:
        with _launching_lock:
            _launching[me] -= 1
            if not _launching[me]:
                del _launching[me]


def shutdown() -> None:
    """Stop the warm forkservers and free the argument snapshots kept between launches; the
    next launch starts afresh."""
    pool.shutdown()
    shm.release()
    slurm = sys.modules.get("mpify.engine.slurm.agents")
    if slurm is not None:  # another node's resident processes, if a Slurm launch started any
        slurm.shutdown()


def ranch(nprocs: int, fn: Callable, *args: Any, ctx: Any = None, caller_rank: int | None = 0,
          gather: bool = False, timeout: float | None = None, show_ranks: None | int | Iterable[int] = None,
          nnodes: int | None = None, node_rank: int = 0, master_addr: str | None = None,
          master_port: int | None = None, launcher: str | None = None,
          need: str | Iterable[str] = "", imports: str = "", **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` on ranks 0..nprocs-1 and return rank 0's result.

    The caller runs rank ``caller_rank`` (0 by default; None: every rank is a child process).
    ``ctx``: a context manager, or a factory of one, entered around fn in every rank.
    ``gather=True`` returns the list of every local rank's result instead of rank 0's.
    ``timeout``: seconds from the ranks' start after which every rank is stopped and LaunchTimeoutError
    raised.
    ``show_ranks``: whose output to show (None: every rank; an int or a collection of ranks).
    ``nnodes``/``node_rank``/``master_addr``/``master_port``: multi-node; RANK is
    node_rank * nprocs + local_rank, and node 0's launcher hosts the rendezvous store.
    ``launcher="slurm"``: inside a Slurm allocation, the other nodes' ranks start as srun steps
    (slurm/agents.py); this process is node 0 (``nnodes``: the allocation's node count by default), and
    the result (or ``gather``'s list) covers every node's ranks.
    ``need``/``imports``: the original mpify's names of caller globals to ship, and import lines
    run in every rank. Every other keyword argument goes to fn.
    """
    _check_int("nprocs", nprocs, 1)
    if not callable(fn):
        raise TypeError(f"fn must be callable, not {type(fn).__name__}")
    if launcher not in (None, "slurm"):
        raise ValueError(f"launcher must be None or 'slurm', got {launcher!r}")
    nodes = None
    if launcher == "slurm":
        from mpify.engine.slurm import agents as slurm  # only a Slurm launch needs it (srun, the channel)

        if node_rank != 0:
            raise ValueError("with launcher='slurm' this process is node 0; node_rank is not given")
        nodes = slurm.Nodes.of_allocation()
        nnodes = len(nodes.names) if nnodes is None else nnodes
        master_addr = master_addr or slurm.node_address(nodes.here)
    nnodes = 1 if nnodes is None else nnodes
    _check_int("nnodes", nnodes, 1)
    _check_int("node_rank", node_rank, 0, nnodes - 1)
    if caller_rank is not None:
        _check_int("caller_rank", caller_rank, 0, nprocs - 1)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if master_port is not None:
        _check_int("master_port", master_port, 1, 65535)
    if not isinstance(imports, str):
        raise TypeError(f"imports must be a string of import lines, not {type(imports).__name__}")
    show = rank_filter(show_ranks)
    needed = _needed_globals(need, _user_globals()) if need else {}

    topo = Topology(nprocs, nnodes, node_rank)
    has_children = caller_rank is None or nprocs > 1
    blob = None
    writer = shm.ShmWriter()
    want_store = bool(getattr(ctx, "mpify_hosts_store", False))
    stdout, stderr = gates(sys.stdout, sys.stderr)
    with _only_this_thread(), InterruptGuard() as guard, _removing(writer), _closing(stdout, stderr), \
            _gated(stdout, stderr, caller_rank is not None):
        if has_children:
            shm.sweep_stale()
            blob = serialize.dumps_launch(fn, args, kwargs, {"ctx": ctx, "need": needed, "imports": imports}, writer)
        meeting = rendezvous.meet(master_addr, master_port, topo.world_size, node_rank, nnodes, want_store)
        launch = Launch(topo, caller_rank, gather, show, timeout, guard, meeting)
        try:
            if nodes is not None and nnodes > 1:
                launch.add_nodes(nodes.others(nnodes - 1), fn, args, kwargs, ctx, imports, stdout, stderr)
            launch.start(blob, stdout, stderr)
            if caller_rank is not None:
                launch.run_caller(fn, args, kwargs, ctx, imports, needed)
            launch.wait()
        except KeyboardInterrupt:
            guard.interrupted.set()
            launch.begin_stop("interrupt")
        finally:
            launch.teardown()
    if has_children:
        pool.catch_up()
    return launch.outcome()
