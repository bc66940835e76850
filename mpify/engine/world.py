"""A live world: ranks that stay between calls, the caller being rank 0.

`ranch` builds a world for one call and tears it down (a launch). A `World` starts ranks
1..N-1 once, from the warm forkserver, enters ctx once in every rank (TorchDDPCtx: one process
group for the world's life), and then runs any number of rounds on them: a function (`run`),
source text in each rank's persistent namespace (`exec`, and the `%%ranch` cell magic), names
pushed or pulled. Everything a launch promises holds for each round (typed errors with the
rank, live output, interrupts, nothing left behind), plus one more: a failure in a round leaves
the world usable, or closes it and says what was lost.

Like a launch (trio's nursery), nothing the world started outlives it: `close()`, the `with`
block's end, interpreter exit, or the caller's death (the ranks' watchdogs) ends every rank.

Threads in the caller while a world lives:
- the supervisor reads every rank's output, replies and exit, all the time (a rank never blocks
  on a full pipe, even between rounds), and during a round the SIGINT wakeup pipe;
- during a round's stop, a stopper walks the ladder below, so the supervisor keeps reading.

How a round stops when a rank failed or the user interrupted (each step bounded):
1. ask: SIGINT to every child still busy, RankAborted in the caller's rank; ranks in Python
   return at once;
2. break: a rank still busy after ASK_GRACE is stuck in C++, almost always a collective whose
   peers will never come. Each stuck rank shuts down its own connections to the other ranks,
   from a thread of its own (unstick.py), so its collective fails;
3. kill: a child still stuck after BREAK_GRACE is killed, and the world is closed.
After a break, the world's group is rebuilt (ctx left and entered again in every rank): the
namespaces are kept, a DDP model wrapped over the old group must be wrapped again.
A rank that dies closes the world: a dead rank's namespace cannot be rebuilt, and its peers
may be blocked on it.
"""
from __future__ import annotations

import atexit
import itertools
import os
import signal
import socket
import sys
import threading
import time
import weakref
from collections import deque
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import multiprocess.connection as mpc

from mpify.engine import rendezvous
from mpify.engine.launch import teardown
from mpify.engine.start import pool
from mpify.engine.rank import groups
from mpify.engine.args import serialize, shm
from mpify.engine.rank.child import RankSpec, _in_fn, call_fn, rank_scope, stamp_failure
from mpify.engine.debug import debug as _debug
from mpify.engine.env import LAUNCH_PORT_VAR, THREADS_VAR, Topology, caller_threads, held, rank_env
from mpify.engine.errors import LaunchBusyError, MpifyError, RankDiedError, add_note
from mpify.engine.launch.interrupts import InterruptGuard, RankAborted, WakeupRelay
from mpify.engine.launch.blame import Failure, causes as blame_causes
from mpify.engine.launch.ranch import _check_int, _gated
from mpify.engine.launch.supervisor import DEATH_SLACK, _annotate
from mpify.engine.messages import (Call, Close, Done, Exec, Failed, Lines, MeetAt, NodeLost, Pull, Push, Rebuild,
                                  Status)
from mpify.engine.output.bars import display_mode
from mpify.engine.output.lines import LineForwarder, LineGate, close_gates, gates, next_due, pump
from mpify.engine.unstick import break_pairs
from mpify.engine.world_rank import destroy_groups, memory_status, run_source, world_main

ASK_GRACE = 1.0  # seconds for busy ranks to return to Python after SIGINT / RankAborted
BREAK_GRACE = 5.0  # seconds for stuck ranks to come back once their peers destroyed their groups
EXIT_GRACE = 5.0  # seconds for ranks to leave ctx and exit at close, before they are stopped
START_TIMEOUT = 600.0  # seconds for every rank to start and enter ctx (torch's own init timeout is longer)

# Set by mpify.torchddp.ctx: (user ctx or None, backend or None) -> the ctx that `ddp=True` means.
_ddp_ctx_factory: Callable[[Any, str | None], Any] | None = None


def register_ddp(factory: Callable[[Any, str | None], Any]) -> None:
    global _ddp_ctx_factory
    _ddp_ctx_factory = factory


class WorldClosedError(MpifyError, RuntimeError):
    """The world was closed (by `close()`, or after a rank died); start a new one."""


class _CurrentStream:
    """The caller's sys.stdout or sys.stderr as it is when a rank's line arrives, not as it was
    when the world started: in Jupyter a line then lands in the cell that runs now (ipykernel
    routes a thread's output by the kernel's current parent), and during a round between the
    caller's own lines (the round's LineGate, in `gates` while the round lasts, whose live
    renderer shows the ranks' bars in the cell or on the terminal)."""

    def __init__(self, name: str, gates: dict | None = None):
        self.name = name
        self.gates = {} if gates is None else gates

    @property
    def live_bars(self):
        gate = self.gates.get(self.name)
        return None if gate is None else gate.live_bars

    def write(self, text: str) -> None:
        stream = self.gates.get(self.name) or getattr(sys, self.name)
        if isinstance(stream, LineGate):
            stream.write_lines(text)
        else:
            stream.write(text)
            stream.flush()

    def flush(self) -> None:
        pass


@dataclass
class _Member:
    """One child rank as the caller sees it."""

    rank: int
    local_rank: int
    proc: Any
    cmd_w: Any
    reply_r: Any
    break_w: Any  # to the rank's breaker thread (see unstick.py)
    alive_w: Any
    streams: dict = field(default_factory=dict)  # output pipe -> LineForwarder
    expect: deque = field(default_factory=deque)  # "round" or "reset", one per reply still owed
    exited: bool = False
    # Another node of a Slurm world (slurm.py): one member for that node's ranks (rank is its
    # first), its resident process's step the process, its channel both cmd_w and reply_r.
    node: int | None = None
    agent: Any = None
    lines: dict = field(default_factory=dict)  # that node's output: stream name -> LineForwarder
    stopped: bool = False  # its process was ended by the world (not a death to report)
    eof: bool = False  # its channel ended: its process is gone or going (its sentinel reports it)
    closed_ok: bool = False  # it answered Close: its ranks are gone, its process may be lent again

    def holds(self, rank: int, nprocs: int) -> bool:
        return rank == self.rank or (self.node is not None and self.rank <= rank < self.rank + nprocs)


class _Round:
    """One command to some ranks (the caller among them or not), and what came back."""

    def __init__(self, members: list[_Member], caller_busy: bool, guard: InterruptGuard | None):
        self.members = {m.rank: m for m in members}
        self.waiting = set(self.members)
        self.caller_busy = caller_busy
        self.guard = guard
        self.replies: dict[int, Done | Failed] = {}
        self.failures: list[Failure] = []
        self.stop_reason: str | None = None
        self.stop_time = float("inf")
        self.cond = threading.Condition()
        self.starting = False  # ranks are entering ctx: a stop closes the store they meet at
        self.broke = False  # groups were destroyed to free a stuck rank: rebuild before going on
        self.killed: list[int] = []  # ranks killed because they stayed stuck
        self.stopper: threading.Thread | None = None

    def settled(self) -> bool:
        return not self.waiting and not self.caller_busy


class World:
    """Ranks 0..nprocs-1 that live across calls; the caller is rank 0.

    ``ctx``: a context manager (or a factory of one) entered once in every rank at start and left
    at close; ``ddp=True`` means ``ctx=TorchDDPCtx(backend=backend)`` (with ``ctx`` inside it).
    ``nnodes``/``node_rank``/``master_addr``/``master_port``: as for ``ranch``.
    ``launcher="slurm"``: inside a Slurm allocation, the other nodes' ranks live in their nodes'
    resident processes (slurm.py), started through srun; this process is node 0 and rank 0
    (``nnodes``: the allocation's node count by default).
    ``caller_rank=None``: every rank is a child (another node's part of a Slurm world).
    The rank environment (RANK, WORLD_SIZE, MASTER_ADDR...) holds in the caller for the world's
    life, and is put back at close.
    """

    def __init__(self, nprocs: int, *, ctx: Any = None, ddp: bool = False, backend: str | None = None,
                 nnodes: int | None = None, node_rank: int = 0, master_addr: str | None = None,
                 master_port: int | None = None, launcher: str | None = None, caller_rank: int | None = 0):
        _check_int("nprocs", nprocs, 1)
        if launcher not in (None, "slurm"):
            raise ValueError(f"launcher must be None or 'slurm', got {launcher!r}")
        if caller_rank not in (0, None):
            raise ValueError("a world's caller is its rank 0 (caller_rank=0), or no rank (None)")
        self.nodes = None
        if launcher == "slurm":
            from mpify.engine import slurm  # only a Slurm world needs it (srun, the channel)

            if node_rank != 0:
                raise ValueError("with launcher='slurm' this process is node 0; node_rank is not given")
            self.nodes = slurm.Nodes.of_allocation()
            nnodes = len(self.nodes.names) if nnodes is None else nnodes
            others = self.nodes.others(nnodes - 1)  # too few nodes: said before anything starts
            master_addr = master_addr or slurm.node_address(self.nodes.here)
        nnodes = 1 if nnodes is None else nnodes
        _check_int("nnodes", nnodes, 1)
        _check_int("node_rank", node_rank, 0, nnodes - 1)
        if master_port is not None:
            _check_int("master_port", master_port, 1, 65535)
        if ddp:
            if _ddp_ctx_factory is None:
                raise MpifyError("ddp=True needs mpify.torchddp.ctx (import mpify)")
            ctx = _ddp_ctx_factory(ctx, backend)
        elif backend is not None:
            raise ValueError("backend= goes with ddp=True")
        self.topo = Topology(nprocs, nnodes, node_rank)
        self.caller = caller_rank is not None
        # A Slurm world's other nodes' addresses: a stuck rank's connections to them are the
        # world's too (unstick.py). Another node's part of the world is told them (remote_hosts).
        self.remote_hosts: list[str] = []
        if self.nodes is not None:
            from mpify.engine import slurm

            self.remote_hosts = [slurm.node_address(n) for n in others]
        self.ctx = ctx
        self.members: list[_Member] = []
        self.closed = False
        self.lost_reason: BaseException | None = None  # why the world closed itself
        self._round: _Round | None = None
        self._round_lock = threading.Lock()
        self._members_lock = threading.Lock()
        self._control_r, self._control_w = os.pipe()
        self._supervisor: threading.Thread | None = None
        self._synced = threading.Event()
        self._relay = WakeupRelay()
        self._gates: dict[str, LineGate] = {}  # the round's, by stream name (see _CurrentStream)
        self._freeing: threading.Thread | None = None
        self.broken = False  # rank 0 was freed from a collective outside a round: rebuild first
        self.regrouped = False  # a cell destroyed a group: the next one meets at a new store
        self._scope = ExitStack()  # the caller's rank: launch_scope + ctx
        self._env_set: dict[str, str] = {}
        self._threads = ExitStack()  # torch's thread count in the caller, put back at close
        self._env_before: dict[str, str] = {}
        self._signals_sent: dict[int, set] = {}
        self._atexit = _closer(weakref.ref(self))
        atexit.register(self._atexit)
        want_store = bool(getattr(ctx, "mpify_hosts_store", False))
        try:
            self.meeting = rendezvous.meet(master_addr, master_port, self.topo.world_size, node_rank, nnodes,
                                           want_store)
            self._start(others if self.nodes is not None else [])
        except BaseException:
            self.close()
            raise

    # ---- starting ------------------------------------------------------------------------------
    def _start(self, others: list[str]) -> None:
        t0 = time.monotonic()
        meeting = self.meeting
        env0 = rank_env(self.topo, 0, meeting.addr, meeting.port, meeting.env)
        writer = shm.ShmWriter()  # the ctx's big buffers, if any: kept until every rank has entered it
        self._scope.callback(writer.cleanup)
        ctx_blob = serialize.dumps_launch(None, (), {}, {"ctx": self.ctx}, writer)
        first_child = 1 if self.caller else 0
        if self.topo.nprocs > first_child:
            # Before the rank environment is set here: the forkserver is the one a launch uses.
            mpctx = pool.context()
            Process = pool.process_class()
        self._env_before = dict(os.environ)
        if self.caller:
            self._env_set = env0
            os.environ.update(env0)
            if THREADS_VAR in env0:
                held[THREADS_VAR] = env0[THREADS_VAR]
                self._threads.callback(held.pop, THREADS_VAR, None)
            self._threads.enter_context(caller_threads(env0))
        if self.topo.nprocs > first_child:
            base_env = dict(os.environ)
            cwd, sys_path = os.getcwd(), list(sys.path)
            for local in range(first_child, self.topo.nprocs):
                rank = self.topo.global_rank(local)
                env = dict(base_env)
                env.update(rank_env(self.topo, local, meeting.addr, meeting.port, meeting.env))
                spec = RankSpec(rank, local, env, cwd, sys_path, True, display_mode(sys.stdout))
                cmd_r, cmd_w = mpctx.Pipe(duplex=False)
                reply_r, reply_w = mpctx.Pipe(duplex=False)
                break_r, break_w = mpctx.Pipe(duplex=False)
                alive_r, alive_w = mpctx.Pipe(duplex=False)
                out_r, out_w = mpctx.Pipe(duplex=False)
                err_r, err_w = mpctx.Pipe(duplex=False)
                proc = Process(target=world_main, name=f"mpify-world-rank{rank}",
                               args=(spec, ctx_blob, cmd_r, reply_w, break_r, alive_r, out_w, err_w))
                member = _Member(rank, local, proc, cmd_w, reply_r, break_w, alive_w)
                member.streams = {out_r: LineForwarder(rank, _CurrentStream("stdout", self._gates), True, "stdout"),
                                  err_r: LineForwarder(rank, _CurrentStream("stderr", self._gates), True, "stderr")}
                member.expect.append("round")  # its start
                self.members.append(member)
                proc.start()
                for end in (cmd_r, reply_w, break_r, alive_r, out_w, err_w):
                    end.close()
        if others:
            self._add_nodes(others)
        if self.caller:
            self._relay.install()
        _debug("world started", [(m.rank, m.proc.pid) for m in self.members], "port", meeting.port)

        def enter() -> None:
            self._scope.enter_context(rank_scope(self.ctx))

        try:
            self._run_round(list(self.members), enter if self.caller else None, sent=True)
        except BaseException as exc:
            if not isinstance(exc, KeyboardInterrupt):
                add_note(exc, "mpify: the world could not start; every rank was stopped")
            raise
        _debug(f"world ready in {time.monotonic() - t0:.3f} s")
        if self.members:
            pool.catch_up()  # for the launches and worlds to come, in the background

    def _add_nodes(self, names: list[str]) -> None:
        """The other nodes of a Slurm world: each node's resident process starts that node's ranks
        (a World of its own, with no caller rank) and answers for them; to this world a node is
        one member whose replies cover its ranks."""
        from mpify.engine import slurm
        from mpify.engine.messages import NodeWorld

        # Pickled without shared memory, which does not cross machines.
        ctx_blob = serialize.dumps((None, (), {}, {"ctx": self.ctx}))
        args = {"nprocs": self.topo.nprocs, "nnodes": self.topo.nnodes, "master_addr": self.meeting.addr,
                "master_port": self.meeting.port, "modules": slurm.shipped(), "heavy": pool.heavy_imported(),
                "hosts": [self.meeting.addr, *self.remote_hosts]}
        for node, agent in enumerate(slurm.lease(names), start=1):
            first = node * self.topo.nprocs
            member = _Member(first, 0, agent.step, agent.conn, agent.conn, slurm.placeholder(), slurm.placeholder(),
                             node=node, agent=agent)
            member.lines = {name: LineForwarder(first, _CurrentStream(name, self._gates), True, name, prefix="")
                            for name in ("stdout", "stderr")}
            member.expect.append("round")  # its start
            self.members.append(member)
            agent.post(NodeWorld(dict(args, node_rank=node), ctx_blob))
            _debug("world: node", node, agent.name, "step", agent.step.pid)

    def _node_blob(self, fn: Any, args: tuple, kwargs: dict, extra: dict) -> bytes:
        """What a command carries to another node: pickled without shared memory."""
        return serialize.dumps((fn, args, kwargs, extra)) if any(m.node is not None for m in self.members) else b""

    # ---- the public calls ------------------------------------------------------------------------
    @property
    def nprocs(self) -> int:
        return self.topo.nprocs

    @property
    def world_size(self) -> int:
        return self.topo.world_size

    def run(self, fn: Callable, *args: Any, gather: bool = False, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` on every rank of the world; rank 0's value (every local
        rank's with ``gather=True``), as ``ranch`` returns it."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        __tracebackhide__ = True  # noqa: F841 (IPython leaves mpify's frames out of tracebacks)
        self._check_open()
        writer = shm.ShmWriter()
        try:
            blob = serialize.dumps_launch(fn, args, kwargs, {}, writer) if self.members else b""
            node_blob = self._node_blob(fn, args, kwargs, {})
            caller_part = (lambda: call_fn(fn, args, kwargs)) if self.caller else None
            values = self._run_round(self._live(None), caller_part,
                                     command=lambda m: Call(blob if m.node is None else node_blob, gather))
        finally:
            writer.cleanup()
        if gather:  # a Slurm world's: every node's ranks
            ranks = range(self.topo.world_size) if self.nodes is not None else \
                [self.topo.global_rank(r) for r in range(self.topo.nprocs)]
            return [values.get(r) for r in ranks]
        return values.get(self.topo.global_rank(0))

    def relay(self, message: Call | Push) -> dict[int, Any]:
        """Another node's part of a Slurm world (slurm_node.py): a command as the caller pickled
        it, to every rank here, unpickled only in the ranks (as the caller's own ranks do: a
        function of the caller's `__main__` finds each rank's namespace); each rank's value."""
        self._check_open()
        return self._run_round(self._live(None), None, command=lambda m: message)

    def exec(self, source: str, ranks: Iterable[int] | None = None, namespace: dict | None = None,
             filename: str | None = None, runner: Callable[[], Any] | None = None, echo: bool = True) -> Any:
        """Run `source` on every rank (or those in `ranks`): rank 0 in `namespace` (the caller's
        `__main__` by default), each other rank in its own persistent namespace. Returns rank
        0's last expression's value (None when rank 0 is not among `ranks`). The other ranks
        print theirs (`echo`), prefixed with their rank, as a notebook would show it."""
        self._check_open()
        wanted = self._wanted(ranks)
        filename = filename or f"<ranch cell {next(_cell_numbers)}>"
        if runner is None:
            if namespace is None:
                import __main__
                namespace = __main__.__dict__
            runner = lambda: run_source(source, namespace, filename)  # noqa: E731
        me = self.topo.global_rank(0)
        caller_part = runner if self.caller and me in wanted else None
        __tracebackhide__ = True  # noqa: F841 (IPython leaves mpify's frames out of tracebacks)

        def command(m: _Member) -> Exec:
            if m.node is None:
                return Exec(source, filename, echo)
            return Exec(source, filename, echo, sorted(r for r in wanted if m.holds(r, self.topo.nprocs)))

        values = self._run_round(self._live(wanted), caller_part, command=command)
        return values.get(me)

    def push(self, **objects: Any) -> None:
        """Bind names in every other rank's namespace; big tensors and arrays go through shared
        memory once, not pickled for each rank. Rank 0 is the caller: bind them there yourself."""
        self._check_open()
        writer = shm.ShmWriter()
        try:
            blob = serialize.dumps_launch(None, (), {}, objects, writer)
            node_blob = self._node_blob(None, (), {}, objects)
            self._run_round(self._live(None), None, command=lambda m: Push(blob if m.node is None else node_blob))
        finally:
            writer.cleanup()

    def pull(self, name: str, rank: int) -> Any:
        """The value bound to `name` in rank `rank`'s namespace (rank 0: the caller's `__main__`)."""
        self._check_open()
        if self.caller and rank == self.topo.global_rank(0):
            import __main__
            return getattr(__main__, name)
        member = self._member(rank)
        if member.exited:
            self._check_open()
        values = self._run_round([member], None, command=lambda m: Pull(name, rank if m.node is not None else None))
        return values[rank]

    def status(self) -> list[dict]:
        """Per rank: pid, alive, device, resident memory (and CUDA memory where used); in a Slurm
        world, each rank's node too."""
        self._check_open()
        here = self.nodes.here if self.nodes is not None else None
        rows = {}
        if self.caller:
            rows[self.topo.global_rank(0)] = dict(memory_status(), rank=self.topo.global_rank(0), alive=True)
        live = self._live(None)
        values = self._run_round(live, None, command=lambda m: Status()) if live else {}
        for m in self.members:
            if m.node is None:
                rows[m.rank] = dict(values.get(m.rank) or {"pid": m.proc.pid}, rank=m.rank, alive=not m.exited)
            else:
                for rank in range(m.rank, m.rank + self.topo.nprocs):
                    rows[rank] = dict(values.get(rank) or {}, rank=rank, alive=not m.exited and rank in values)
        if here is not None:
            for row in rows.values():
                row.setdefault("node", here)
        return [rows[r] for r in sorted(rows)]

    def __enter__(self) -> "World":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{len(self._live(None)) + 1} live ranks"
        return f"<mpify.World of {self.topo.world_size} ({state})>"

    # ---- rounds ----------------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self.closed:
            self.close()  # a rank died between rounds: finish closing in the caller's thread
            raise WorldClosedError("this world is closed" + (f" ({self.lost_reason})" if self.lost_reason else "")
                                   + "; start a new one") from self.lost_reason

    def _wanted(self, ranks: Iterable[int] | None) -> set[int]:
        everyone = set(range(self.topo.world_size)) if self.nodes is not None else \
            {self.topo.global_rank(r) for r in range(self.topo.nprocs)}
        if ranks is None:
            return everyone
        if isinstance(ranks, int) and not isinstance(ranks, bool):
            ranks = [ranks]
        wanted = set(ranks)
        unknown = wanted - everyone
        if unknown:
            raise ValueError(f"no rank {sorted(unknown)} in this world (ranks {min(everyone)}..{max(everyone)})")
        return wanted

    def _live(self, wanted: set[int] | None) -> list[_Member]:
        return [m for m in self.members if not m.exited and
                (wanted is None or any(m.holds(r, self.topo.nprocs) for r in wanted))]

    def _member(self, rank: int) -> _Member:
        for m in self.members:
            if m.holds(rank, self.topo.nprocs):
                return m
        raise ValueError(f"no rank {rank} in this world")

    def _run_round(self, members: list[_Member], caller_part: Callable[[], Any] | None,
                   command: Callable[[_Member], Any] | None = None, sent: bool = False) -> dict[int, Any]:
        """Send `command` to `members`, run `caller_part` as rank 0 meanwhile, wait for every reply;
        stop the round on the first failure or an interrupt; return each rank's value."""
        __tracebackhide__ = True  # noqa: F841 (IPython leaves mpify's frames out of tracebacks)
        if not self._round_lock.acquire(blocking=False):
            raise LaunchBusyError("this world is already running a round (from another thread); wait for it")
        try:
            if self.broken and not sent:
                self.broken = self.regrouped = False
                note = self._rebuild()
                if self.closed:
                    raise WorldClosedError(note)
                print(note, file=sys.stderr)
            if self.regrouped and not sent:
                self.regrouped = False
                self._meet_anew()
            out, err = gates(sys.stdout, sys.stderr)
            self._gates.update(stdout=out, stderr=err)
            with InterruptGuard() as guard:
                rnd = _Round(members, caller_part is not None, guard)
                rnd.starting = sent
                self._round = rnd
                if self._supervisor is None:
                    # Started once the start round is in place: replies to it may come at once.
                    self._supervisor = threading.Thread(target=self._supervise, name="mpify-world", daemon=True)
                    self._supervisor.start()
                self._wake()
                try:
                    if not sent:
                        for m in members:
                            self._send(m, command(m), "round", rnd)
                    caller_value = None
                    if caller_part is not None:
                        with _gated(out, err, True):
                            caller_value = self._run_caller(rnd, caller_part)
                    self._wait(rnd)
                finally:
                    self._round = None
                    self._sync()  # the supervisor stops watching the guard's pipe before it closes
                    self._gates.clear()
                    close_gates(out, err)
            return self._outcome(rnd, caller_value)
        finally:
            self._round = None
            self._round_lock.release()

    def _send(self, member: _Member, message: Any, kind: str, rnd: _Round | None) -> None:
        with self._members_lock:
            member.expect.append(kind)
        try:
            member.cmd_w.send_bytes(serialize.dumps(message))
        except (OSError, ValueError):  # it died: the supervisor reports it
            with self._members_lock:
                if member.expect and member.expect[-1] == kind:
                    member.expect.pop()
            if rnd is not None and kind == "round":
                with rnd.cond:
                    rnd.waiting.discard(member.rank)
                    rnd.cond.notify_all()

    def _run_caller(self, rnd: _Round, part: Callable[[], Any]) -> Any:
        me = self.topo.global_rank(0)
        value = None
        _in_fn.set()
        try:
            value = part()
        except RankAborted:
            pass
        except KeyboardInterrupt:
            rnd.guard.interrupted.set()
            self._begin_stop(rnd, "interrupt")
        except BaseException as exc:
            self._record(rnd, Failure(me, stamp_failure(exc), exc))
        finally:
            _in_fn.clear()
            # As every rank does after each cell (world_rank.py). A default group spans every
            # rank, rank 0 too, so rank 0 alone tells whether one was destroyed.
            if groups.release_destroyed():
                self.regrouped = True
            with rnd.cond:
                rnd.caller_busy = False
                rnd.cond.notify_all()
        return value

    def _wait(self, rnd: _Round) -> None:
        while True:
            try:
                with rnd.cond:
                    rnd.cond.wait_for(lambda: rnd.settled() or self.closed and not rnd.waiting)
                if rnd.stopper is not None:
                    rnd.stopper.join()
                return
            except KeyboardInterrupt:
                rnd.guard.interrupted.set()
                self._begin_stop(rnd, "interrupt")

    def _record(self, rnd: _Round, failure: Failure) -> None:
        _debug("world: failure of rank", failure.rank, type(failure.error).__name__)
        with rnd.cond:
            rnd.failures.append(failure)
        if failure.when < rnd.stop_time:
            self._begin_stop(rnd, "failure")

    def _begin_stop(self, rnd: _Round, reason: str) -> None:
        # The caller's rank is aborted unless this is an interrupt (its SIGINT handler raises
        # KeyboardInterrupt already) or the caller's own rank failed and called us (it is
        # unwinding already).
        abort = reason != "interrupt" and threading.get_ident() != rnd.guard.thread_id
        with rnd.cond:
            if rnd.stop_reason is not None or rnd.settled():
                return
            rnd.stop_reason = reason
            rnd.stop_time = time.monotonic()
            # Started before it is seen: the round's waiter joins it once the round settles, which
            # a reply arriving meanwhile may make happen at once (the ladder waits on this lock).
            stopper = threading.Thread(target=self._stop, args=(rnd, reason, abort), name="mpify-world-stopper",
                                       daemon=True)
            stopper.start()
            rnd.stopper = stopper
        _debug("world: stopping the round:", reason)

    def _stop(self, rnd: _Round, reason: str, abort: bool) -> None:
        """The ladder: ask, break, kill (see the module's docstring)."""
        if rnd.starting:
            # A rank blocked in init_process_group waits in a C++ polling loop on the store,
            # where no signal reaches; closing the store makes it fail at once.
            self.meeting.close()
        with rnd.cond:
            busy = [rnd.members[r] for r in rnd.waiting]
        for m in busy:
            self._signal(m, signal.SIGINT)
        if abort and rnd.caller_busy:
            rnd.guard.abort_caller_rank()
        with rnd.cond:
            if rnd.cond.wait_for(rnd.settled, ASK_GRACE):
                return
        # Still busy: stuck in C++, almost always in a collective. Each stuck rank shuts down its
        # own connections to the others, from a thread of its own (unstick.py).
        with rnd.cond:
            stuck_children = [rnd.members[r] for r in rnd.waiting]
            caller_stuck = rnd.caller_busy
        request = serialize.dumps((self._pids(), self.meeting.port, self.remote_hosts))
        for m in stuck_children:
            try:
                m.break_w.send_bytes(request)
            except (OSError, ValueError):  # it died meanwhile: the supervisor reports it
                pass
        if caller_stuck:
            self._free_rank0()
        rnd.broke = True
        with rnd.cond:
            if rnd.cond.wait_for(rnd.settled, BREAK_GRACE):
                return
        with rnd.cond:
            stuck = [rnd.members[r] for r in rnd.waiting]
        if stuck:
            rnd.killed = [m.rank for m in stuck]
            _debug("world: ranks still stuck, killed:", rnd.killed)
            for m in stuck:
                if m.node is not None:  # its process is ended, its ranks with it
                    m.stopped = True
                    m.agent.stop()
            teardown.stop_ranks([m.proc.pid for m in stuck if m.node is None], first=signal.SIGKILL,
                                sent=self._signals_sent)

    def _free_rank0(self) -> bool:
        """Shut down the caller's connections to the other ranks (see unstick.py)."""
        try:
            break_pairs(self._pids(), self.meeting.port, self.remote_hosts, self._channels())
            return True
        except Exception as exc:  # psutil cannot see them: the ladder goes on to its next step
            _debug("world: freeing rank 0:", exc)
            return False

    def _channels(self) -> list[tuple]:
        """The other nodes' channels (slurm.py), as (local, remote) address pairs: never shut down
        to free a rank, they carry the world's own commands."""
        pairs = []
        for m in self.members:
            if m.node is not None:
                try:
                    sock = socket.socket(fileno=os.dup(m.agent.conn.fileno()))
                    with sock:
                        pairs.append((sock.getsockname()[:2], sock.getpeername()[:2]))
                except OSError:  # gone
                    pass
        return pairs

    def _pids(self) -> list[int]:
        """This machine's processes of the world (another node's are freed by that node)."""
        return [os.getpid()] * self.caller + [m.proc.pid for m in self.members if not m.exited and m.node is None]

    def _signal(self, member: _Member, sig: int) -> None:
        if member.node is not None:  # the node stops its ranks with its own ladder, and answers
            member.agent.interrupt()
            return
        try:
            os.kill(member.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _outcome(self, rnd: _Round, caller_value: Any) -> dict[int, Any]:
        __tracebackhide__ = True  # noqa: F841 (IPython leaves mpify's frames out of tracebacks)
        notes = []
        closed = bool(rnd.killed) or self.lost_reason is not None
        if closed:
            why = (f"rank(s) {', '.join(map(str, rnd.killed))} stayed stuck and were killed" if rnd.killed
                   else str(self.lost_reason))
            lost = ", ".join(str(r) for m in self.members
                             for r in (range(m.rank, m.rank + self.topo.nprocs) if m.node is not None else [m.rank]))
            self.close()
            notes.append(f"mpify: {why}; the world is closed: the namespaces of ranks {lost} are lost, rank 0's "
                         "(this process's) is untouched; start a new world")
        elif rnd.broke:
            notes.append(self._rebuild())
        causes = blame_causes(rnd.failures, rnd.stop_time)
        if rnd.guard.interrupted.is_set():
            exc: BaseException = KeyboardInterrupt()
        elif causes:
            first = causes[0]
            exc = first.error
            _annotate(exc, first.rank, self.topo.world_size, sorted({f.rank for f in causes}))
        elif closed:
            exc = self.lost_reason if self.lost_reason is not None else WorldClosedError(notes[0])
        else:
            values = {self.topo.global_rank(0): caller_value} if self.caller else {}
            for rank, reply in rnd.replies.items():
                value = serialize.loads(reply.blob) if reply.blob is not None else None
                if rnd.members[rank].node is not None:  # a node's ranks' values, by global rank
                    values.update(value or {})
                else:
                    values[rank] = value
            return values
        for note in notes:
            add_note(exc, note)
        raise exc

    def _new_meeting(self) -> dict[str, str]:
        """A new store at a new port for the world's next group, the old one closed; what the
        ranks must set to meet there."""
        old = self.meeting
        self.meeting = rendezvous.meet(old.addr, None, self.topo.world_size, 0, 1, True)
        # The store's variables too: the first meeting may have had none (torch was not imported
        # yet), and a rank 0 that is not told the world hosts the store would host one itself.
        env = {**self.meeting.env, "MASTER_PORT": str(self.meeting.port), LAUNCH_PORT_VAR: str(self.meeting.port)}
        old.close()
        self._env_set.update(env)
        return env

    def _meet_anew(self) -> None:
        """The last cell destroyed a group (a framework's training call makes and destroys its
        own): the next group meets at a new store. The old store still holds the destroyed
        group's keys, and a new default group has the same name, so a rank that came before
        rank 0 read rank 0's old gloo address there ("Gloo connectFullMesh failed", ignite's
        idist.Parallel in a second cell). A multi-node world keeps its store: the other nodes'
        ranks were told its port."""
        if self.topo.nnodes > 1:
            return
        env = self._new_meeting()
        os.environ.update(env)
        for m in self._live(None):
            try:
                m.cmd_w.send_bytes(serialize.dumps(MeetAt(env)))
            except (OSError, ValueError):  # it died: the supervisor reports it
                pass
        _debug("world: the next group meets at port", env["MASTER_PORT"])

    def _rebuild(self) -> str:
        """Leave and enter the world's ctx in every rank (a new group); say what that means."""
        _debug("world: rebuilding the process group")
        if self.topo.nnodes > 1:
            self.close()
            return ("mpify: ranks were stuck in a collective and their connections were shut down to free them; "
                    "a multi-node world cannot rebuild its group, so it is closed: the other ranks' namespaces "
                    "are lost, rank 0's is untouched")
        env = self._new_meeting()
        live = self._live(None)
        rnd = _Round(live, True, None)
        self._round = rnd
        for m in live:
            self._send(m, Rebuild(env), "round", rnd)
        failure = None
        try:
            scope, self._scope = self._scope, ExitStack()
            try:
                scope.close()
            except Exception as exc:
                _debug("world: leaving rank 0's ctx:", exc)
            destroy_groups()
            os.environ.update(env)  # after ctx's exit, which puts back the environment it found
            self._scope.enter_context(rank_scope(self.ctx))
        except BaseException as exc:
            failure = exc
        finally:
            with rnd.cond:
                rnd.caller_busy = False
                rnd.cond.notify_all()
        with rnd.cond:
            rnd.cond.wait_for(lambda: not rnd.waiting or self.closed, START_TIMEOUT)
        self._round = None
        failed = [r for r in rnd.replies.values() if isinstance(r, Failed)]
        if failure is None and not failed and not self.closed:
            return ("mpify: ranks were stuck in a collective; their connections were shut down to free them and "
                    "the world's process group was rebuilt: every rank's namespace is kept, but a DDP model "
                    "wrapped before must be wrapped again")
        why = failure or (failed[0].rebuild() if failed else self.lost_reason)
        self.close()
        return (f"mpify: the world's process group could not be rebuilt after freeing stuck ranks ({why!r}); "
                "the world is closed: the other ranks' namespaces are lost, rank 0's is untouched")

    # ---- the supervisor thread -------------------------------------------------------------------
    def _wake(self, what: bytes = b"x") -> None:
        try:
            os.write(self._control_w, what)
        except OSError:
            pass

    def _sync(self) -> None:
        """Return once the supervisor has seen the current `_round` (it rebuilds its table)."""
        if self._supervisor is None or not self._supervisor.is_alive():
            return
        self._synced.clear()
        self._wake(b"s")
        self._synced.wait(5.0)

    def _supervise(self) -> None:
        try:
            while not self._supervise_once():
                pass
        except BaseException as exc:  # a bug here must not leave the caller waiting forever
            self.lost_reason = MpifyError(f"mpify's world supervisor failed: {exc!r}")
            self._lose_all()
            raise

    def _supervise_once(self) -> bool:
        table: dict = {self._control_r: self._on_control}
        rnd = self._round
        if rnd is not None and rnd.guard is not None and rnd.guard.main:
            table[rnd.guard.wakeup_r] = lambda: self._on_wakeup(rnd)
        if self._relay.installed:
            table[self._relay.read_fd] = self._on_idle_sigint
        for m in self.members:
            for conn in m.streams:
                table[conn] = lambda m=m, conn=conn: pump(m.streams, conn)
            if not m.reply_r.closed and not m.eof:
                table[m.reply_r] = lambda m=m: self._on_reply(m)
            if not m.exited:
                table[m.proc.sentinel] = lambda m=m: self._on_exit(m)
        # A bar frame held back by the throttle (output/lines.py) is shown when it is due.
        due = next_due(fwd for m in self.members for fwd in (*m.streams.values(), *m.lines.values()))
        ready = mpc.wait(list(table), None if due is None else max(0.0, due - time.monotonic()))
        # Output first: a rank writes its output before its reply, so the cell gets every line
        # before the round ends.
        ready.sort(key=lambda obj: 0 if any(obj in m.streams for m in self.members) else 1)
        stop = False
        for obj in ready:
            if table[obj]() is True:
                stop = True
        return stop

    def _on_control(self) -> bool:
        data = os.read(self._control_r, 512)
        if b"s" in data:
            self._synced.set()
        return b"q" in data

    def _on_wakeup(self, rnd: _Round) -> None:
        try:
            interrupted = rnd is self._round and rnd.guard.read_wakeup()
        except OSError:  # the round ended and its guard closed the pipe meanwhile
            return
        if interrupted:
            self._begin_stop(rnd, "interrupt")

    def _on_idle_sigint(self) -> None:
        """Ctrl-C outside a round: if the caller's main thread stays inside torch.distributed,
        it is stuck in a collective the other ranks never joined; free it."""
        if self._relay.read() and self._round is None and (self._freeing is None or not self._freeing.is_alive()):
            self._freeing = threading.Thread(target=self._free_caller, name="mpify-world-freer", daemon=True)
            self._freeing.start()

    def _free_caller(self) -> None:
        main = threading.main_thread().ident
        time.sleep(ASK_GRACE)  # back in Python by now, unless stuck in C++
        frame = sys._current_frames().get(main)
        inside = []
        while frame is not None:
            inside.append(frame.f_code.co_filename)
            frame = frame.f_back
        if self._round is not None or self.closed or not any(
                os.sep.join(("torch", "distributed")) in name for name in inside):
            return
        _debug("world: rank 0 stuck in torch.distributed outside a round: freeing it")
        if not self._free_rank0():
            return
        self.broken = True
        _CurrentStream("stderr").write(
            "mpify: rank 0 was stuck in a collective the other ranks never joined; its connections were shut "
            "down to free it, and the world's process group will be rebuilt at the next %%ranch cell "
            "(namespaces kept; a DDP model wrapped before must be wrapped again)\n")

    def _on_reply(self, member: _Member) -> None:
        try:
            message = serialize.loads(member.reply_r.recv_bytes())
        except (EOFError, OSError):
            if member.node is None:
                member.reply_r.close()
            else:
                member.eof = True
            return
        if isinstance(message, Lines):  # a node's ranks' output, before its reply
            member.lines[message.stream].feed(message.data)
            return
        if isinstance(message, NodeLost):  # the node's part of the world closed itself
            self._on_node_lost(member, message.text)
            return
        with self._members_lock:
            kind = member.expect.popleft() if member.expect else "stray"
        _debug("world: reply from rank", member.rank, kind, type(message).__name__)
        if kind == "close" and member.node is not None:  # its ranks left ctx and exited
            member.exited = member.closed_ok = True
            self._notify_round(member)
            return
        rnd = self._round
        if kind != "round" or rnd is None or member.rank not in rnd.members:
            if isinstance(message, Failed):
                _debug("world: rank", member.rank, kind, "failed:", message.text)
            return
        if member.node is not None and isinstance(message, Failed):
            # Another machine's clock: dated at its arrival, backdated as a death is, unless it
            # answers the stop's own Interrupt (as a launch dates a node's failure).
            now = time.monotonic()
            ours = rnd.stop_reason is not None and message.type_name == "builtins.KeyboardInterrupt"
            message.when = now if ours else now - DEATH_SLACK
        with rnd.cond:
            rnd.replies[member.rank] = message
            rnd.waiting.discard(member.rank)
            rnd.cond.notify_all()
        if isinstance(message, Failed) and rnd.guard is not None:  # a rebuild reads its replies itself
            error = message.rebuild()
            if member.node is not None:
                add_note(error, f"mpify: on node {member.node}")
            self._record(rnd, Failure(message.rank, message.when, error))

    def _on_node_lost(self, member: _Member, text: str) -> None:
        """A node's ranks are gone (one died, or they stayed stuck): the world cannot go on."""
        member.exited = True
        if self.closed:
            self._notify_round(member)
            return
        self.lost_reason = WorldClosedError(f"the ranks of {text}")
        if self._round is None:
            _CurrentStream("stderr").write(f"mpify: {self.lost_reason}; the world is closed (ranks' namespaces "
                                           "lost); start a new one\n")
        threading.Thread(target=self._lose_all, name="mpify-world-closer", daemon=True).start()
        self._notify_round(member)

    def _on_exit(self, member: _Member) -> None:
        member.proc.join(1.0)  # only this thread reads exit codes (see teardown.rank_alive)
        code = member.proc.exitcode if member.proc.exitcode is not None else -signal.SIGKILL
        member.exited = True
        _debug("world: rank", member.rank, "exited with", code)
        if self.closed:
            self._notify_round(member)
            return
        ours = code < 0 and -code in self._signals_sent.get(member.proc.pid, ()) or member.stopped
        death = RankDiedError(member.rank, code)
        if member.node is not None:
            said = member.agent.said()
            add_note(death, f"mpify: node {member.node}'s process (ranks {member.rank}-"
                            f"{member.rank + self.topo.nprocs - 1}) ended" + (f"; its last words:\n{said}" if said else ""))
        rnd = self._round
        if not ours:
            self.lost_reason = death
            if rnd is not None and rnd.guard is not None:
                self._record(rnd, Failure(member.rank, time.monotonic() - DEATH_SLACK, death))
            else:  # between rounds: say so where the user looks now
                _CurrentStream("stderr").write(f"mpify: {death}; the world is closed (ranks' namespaces lost); "
                                               "start a new one\n")
            threading.Thread(target=self._lose_all, name="mpify-world-closer", daemon=True).start()
        self._notify_round(member)

    def _notify_round(self, member: _Member) -> None:
        rnd = self._round
        if rnd is not None:
            with rnd.cond:
                rnd.waiting.discard(member.rank)
                rnd.cond.notify_all()

    def _lose_all(self) -> None:
        """A rank died: stop every other rank (the world cannot go on without it). The store
        goes first: a caller blocked in init_process_group on the dead rank fails at once."""
        self.meeting.close()
        pids = [m.proc.pid for m in self.members if not m.exited and m.node is None]
        for m in self.members:
            if m.node is not None and not m.exited:  # busy, or blocked on the dead rank: ended
                m.stopped = True
                m.agent.stop()
        teardown.stop_ranks(pids, first=signal.SIGTERM, sent=self._signals_sent)
        self.closed = True
        rnd = self._round
        if rnd is not None:
            with rnd.cond:
                rnd.cond.notify_all()

    # ---- closing ---------------------------------------------------------------------------------
    def close(self) -> None:
        """Leave ctx in every rank, stop every process the world started, put the caller's
        environment back. Idempotent; also run at interpreter exit."""
        if getattr(self, "_closed_fully", False):
            return
        self._closed_fully = True
        self.closed = True
        atexit.unregister(self._atexit)
        for m in self.members:
            if not m.exited:
                self._send(m, Close(), "close", None)
        try:
            self._scope.close()  # the caller's rank leaves ctx meanwhile
        except Exception as exc:  # a group already broken: nothing else to do with it
            _debug("world: leaving rank 0's ctx:", exc)
        deadline = time.monotonic() + EXIT_GRACE
        while time.monotonic() < deadline and any(not m.exited and (m.node is not None or
                                                                    teardown.rank_alive(m.proc.pid))
                                                  for m in self.members):
            time.sleep(0.01)
        nodes = [m for m in self.members if m.node is not None]
        for m in nodes:
            if not m.closed_ok:  # did not answer Close (its part closed itself, or it hangs):
                m.stopped = True  # its process is ended, not lent again with a reply unread
                m.agent.stop()
        pids = [m.proc.pid for m in self.members if m.proc.pid is not None and m.node is None]
        teardown.stop_ranks(pids, first=signal.SIGTERM, sent=self._signals_sent)
        teardown.sweep_groups(pids)
        for m in self.members:
            if m.node is None:  # a node's channel is its resident process's
                m.alive_w.close()
                m.cmd_w.close()
                m.break_w.close()
        if self._supervisor is not None and self._supervisor is not threading.current_thread():
            os.write(self._control_w, b"q")
            self._supervisor.join(EXIT_GRACE)
        for m in nodes:
            for fwd in m.lines.values():
                fwd.close()
        if nodes:
            from mpify.engine import slurm

            slurm.give_back([m.agent for m in nodes])
        for m in self.members:
            if m.node is not None:
                continue
            for conn, fwd in list(m.streams.items()):
                fwd.close()
                conn.close()
            m.streams.clear()
            m.reply_r.close()
            if m.proc.pid is not None:
                m.proc.join(0.1)
                if m.proc.exitcode is not None:
                    m.proc.close()
        self._relay.uninstall()
        for fd in (self._control_r, self._control_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if getattr(self, "meeting", None) is not None:
            self.meeting.close()
        self._threads.close()
        # The rank environment goes; what the user changed meanwhile stays.
        for key, value in self._env_set.items():
            if os.environ.get(key) == value:
                if key in self._env_before:
                    os.environ[key] = self._env_before[key]
                else:
                    del os.environ[key]
        _debug("world closed")


def _closer(ref: "weakref.ref[World]") -> Callable[[], None]:
    def close() -> None:
        world = ref()
        if world is not None:
            world.close()
    return close


_cell_numbers = itertools.count(1)
