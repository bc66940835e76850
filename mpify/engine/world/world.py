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

`World` is this module's (starting, the public calls, closing) and its parts': rounds.py (a
round: commands out, replies in, the outcome), stop.py (how a round stops, and the group rebuilt
after a break), supervisor.py (the thread that reads every rank all the time).
"""
from __future__ import annotations

import atexit
import itertools
import os
import signal
import sys
import threading
import time
import weakref
from contextlib import ExitStack
from typing import Any, Callable, Iterable

from mpify.engine import rendezvous
from mpify.engine.args import serialize, shm
from mpify.engine.debug import debug as _debug
from mpify.engine.env import THREADS_VAR, Topology, caller_threads, held, rank_env
from mpify.engine.errors import MpifyError, add_note
from mpify.engine.launch import teardown
from mpify.engine.launch.interrupts import WakeupRelay
from mpify.engine.launch.ranch import _check_int
from mpify.engine.messages import Call, Close, Exec, Pull, Push, Status
from mpify.engine.output.bars import display_mode
from mpify.engine.output.lines import LineForwarder, LineGate
from mpify.engine.rank.child import RankSpec, call_fn, rank_scope
from mpify.engine.start import pool
from mpify.engine.world.members import _CurrentStream, _Member
from mpify.engine.world.rank import memory_status, run_source, world_main
from mpify.engine.world.rounds import Rounds, _Round
from mpify.engine.world.stop import Stopping
from mpify.engine.world.supervisor import Supervisor

EXIT_GRACE = 5.0  # seconds for ranks to leave ctx and exit at close, before they are stopped

# Set by mpify.torchddp.ctx: (user ctx or None, backend or None) -> the ctx that `ddp=True` means.
_ddp_ctx_factory: Callable[[Any, str | None], Any] | None = None


def register_ddp(factory: Callable[[Any, str | None], Any]) -> None:
    global _ddp_ctx_factory
    _ddp_ctx_factory = factory


class World(Rounds, Stopping, Supervisor):
    """Ranks 0..nprocs-1 that live across calls; the caller is rank 0.

    ``ctx``: a context manager (or a factory of one) entered once in every rank at start and left
    at close; ``ddp=True`` means ``ctx=TorchDDPCtx(backend=backend)`` (with ``ctx`` inside it).
    ``nnodes``/``node_rank``/``master_addr``/``master_port``: as for ``ranch``.
    ``launcher="slurm"``: inside a Slurm allocation, the other nodes' ranks live in their nodes'
    resident processes (slurm/agents.py), started through srun; this process is node 0 and rank 0
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
            from mpify.engine.slurm import agents as slurm  # only a Slurm world needs it (srun, the channel)

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
            from mpify.engine.slurm import agents as slurm

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
        self._pidfds: dict[int, int] = {}  # pid -> the rank's pidfd (launch/teardown.track)
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
                teardown.track(self._pidfds, proc.pid)
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
        from mpify.engine.slurm import agents as slurm
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
        """Another node's part of a Slurm world (slurm/node.py): a command as the caller pickled
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
                                                                    teardown.rank_alive(m.proc.pid, self._pidfds))
                                                  for m in self.members):
            time.sleep(0.01)
        nodes = [m for m in self.members if m.node is not None]
        for m in nodes:
            if not m.closed_ok:  # did not answer Close (its part closed itself, or it hangs):
                m.stopped = True  # its process is ended, not lent again with a reply unread
                m.agent.stop()
        pids = [m.proc.pid for m in self.members if m.proc.pid is not None and m.node is None]
        teardown.stop_ranks(pids, first=signal.SIGTERM, sent=self._signals_sent, handles=self._pidfds)
        teardown.sweep_groups(pids, self._pidfds)
        teardown.release(self._pidfds)
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
            from mpify.engine.slurm import agents as slurm

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
