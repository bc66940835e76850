"""A launch: the `Launch` object that `ranch` (ranch.py) makes, and its supervisor thread.

One `Launch` object holds everything a launch starts (after torch's ProcessContext) and, like a
trio nursery, nothing it started outlives it: whatever way the caller leaves (result, error,
timeout, Ctrl-C), `Launch.teardown` has stopped every rank and its group, closed every pipe and
the rendezvous store, and joined its threads before ranch returns or raises.

Threads in the caller during a launch:
- the caller's own thread runs its rank (rank 0 by default) in the foreground, so progress bars
  and prints behave as usual in the notebook;
- the supervisor thread waits on everything else at once: result pipes, process sentinels,
  output pipes, the SIGINT wakeup pipe and the deadline. The first failure starts the stop;
- a short-lived stopper thread walks the SIGINT/SIGTERM/SIGKILL ladder so the supervisor keeps
  draining output meanwhile.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import multiprocess.connection as mpc

from mpify.engine import rendezvous
from mpify.engine.args import serialize
from mpify.engine.debug import debug as _debug
from mpify.engine.env import Topology, caller_threads, patched_environ, rank_env
from mpify.engine.errors import LaunchTimeoutError, MpifyError, RankDiedError, add_note
from mpify.engine.launch import teardown
from mpify.engine.launch.blame import Failure, causes as blame_causes
from mpify.engine.launch.interrupts import InterruptGuard, RankAborted
from mpify.engine.messages import Done, Failed, Lines
from mpify.engine.output.bars import display_mode
from mpify.engine.output.lines import LineForwarder, next_due, pump
from mpify.engine.rank.child import RankSpec, rank_main, run_rank, stamp_failure
from mpify.engine.start import pool

# A death is only seen after it happened, while a rank blocked on the dead one may raise
# (e.g. gloo's "Connection closed by peer") a moment before the supervisor notices. Deaths are
# dated this much earlier so that the dead rank, the cause, is reported rather than its victim.
DEATH_SLACK = 0.5
# How long ranks that returned may take to exit before they are stopped.
EXIT_GRACE = 5.0
# How long to keep reading output once every rank is gone (an escaped grandchild may hold a pipe).
DRAIN_GRACE = 1.0
# How long another node may take to answer once asked to stop (its own ladder: ask, terminate,
# kill), before its node process is ended.
NODE_GRACE = 15.0


@dataclass
class Child:
    rank: int
    local_rank: int
    proc: Any
    result_r: Any
    alive_w: Any
    streams: dict = field(default_factory=dict)  # output pipe (Connection) -> LineForwarder
    outcome: Done | Failed | None = None  # the message it sent
    exited: bool = False
    node: int | None = None  # another node of a Slurm launch (slurm/agents.py): its step, not a rank
    agent: Any = None  # that node's resident process (slurm.Agent): its channel is result_r
    lines: dict = field(default_factory=dict)  # that node's output: stream name -> LineForwarder


class Launch:
    def __init__(self, topo: Topology, caller_rank: int | None, gather: bool, show: Callable[[int], bool],
                 timeout: float | None, guard: InterruptGuard, meeting: rendezvous.Meeting):
        self.topo = topo
        self.caller_rank = caller_rank
        self.gather = gather
        self.show = show
        self.deadline: float | None = None  # set once the ranks are started (start)
        self.timeout = timeout
        self.guard = guard
        self.meeting = meeting
        self.children: list[Child] = []
        self.failures: list[Failure] = []
        self.caller_value: Any = None
        self.stop_reason: str | None = None
        self.stop_time = float("inf")
        self._lock = threading.Lock()
        self._done = threading.Event()  # every child finished, or the stop began
        self._exits = threading.Condition()  # notified by the supervisor as each child exits
        self._control_r, self._control_w = os.pipe()
        self._supervisor: threading.Thread | None = None
        self._stopper: threading.Thread | None = None
        self.internal_error: BaseException | None = None
        # An exception that interrupted the caller's rank is kept (with its frames) until the
        # launch is over: its frames may hold the last reference to a DDP model, and freeing that
        # while gloo's worker thread still finishes an aborted all-reduce deadlocks in torch (the
        # ProcessGroupGloo destructor joins that thread holding the GIL, and the thread needs the
        # GIL to let go of its work). After teardown the workers are idle and freeing is safe.
        self.kept_alive: BaseException | None = None
        self.signals_sent: dict[int, set] = {}  # pid -> signals the stop sent it
        self.pidfds: dict[int, int] = {}  # pid -> the rank's pidfd (teardown.track)

    # ---- starting -------------------------------------------------------------------------
    def start(self, launch: bytes | None, stdout, stderr) -> None:
        local_ranks = [r for r in range(self.topo.nprocs) if r != self.caller_rank]
        if local_ranks:
            mpctx = pool.context()
            Process = pool.process_class()
            base_env = dict(os.environ)
            cwd, sys_path = os.getcwd(), list(sys.path)
            for local in local_ranks:
                rank = self.topo.global_rank(local)
                env = dict(base_env)
                env.update(rank_env(self.topo, local, self.meeting.addr, self.meeting.port, self.meeting.env))
                send = self.gather or (local == 0)
                spec = RankSpec(rank, local, env, cwd, sys_path, send, display_mode(stdout))
                result_r, result_w = mpctx.Pipe(duplex=False)
                alive_r, alive_w = mpctx.Pipe(duplex=False)
                out_r, out_w = mpctx.Pipe(duplex=False)
                err_r, err_w = mpctx.Pipe(duplex=False)
                proc = Process(target=rank_main, name=f"mpify-rank{rank}",
                               args=(spec, launch, result_w, alive_r, out_w, err_w))
                child = Child(rank, local, proc, result_r, alive_w)
                child.streams = {out_r: LineForwarder(rank, stdout, self.show(rank), "stdout"),
                                 err_r: LineForwarder(rank, stderr, self.show(rank), "stderr")}
                self.children.append(child)
                proc.start()
                teardown.track(self.pidfds, proc.pid)
                for end in (result_w, alive_r, out_w, err_w):
                    end.close()
        _debug("started", [(c.rank, c.proc.pid) for c in self.children], "port", self.meeting.port)
        # The timeout is the ranks' time: a wait for a forkserver to be ready is not counted.
        if self.timeout is not None:
            self.deadline = time.monotonic() + self.timeout
        self._supervisor = threading.Thread(target=self._supervise, name="mpify-supervisor", daemon=True)
        self._supervisor.start()
        if not self.children:
            self._done.set()

    def add_nodes(self, names: list[str], fn, args, kwargs, ctx, imports, stdout, stderr) -> None:
        """Start the other nodes of a Slurm launch (slurm/agents.py): one child per node, its resident
        process's step the process, its channel the result pipe, which also brings its ranks'
        lines (already prefixed) before its outcome."""
        from mpify.engine.slurm import agents as slurm
        from mpify.engine.messages import NodeLaunch

        # Pickled without shared memory, which does not cross machines.
        payload = serialize.dumps((fn, args, kwargs, {"ctx": ctx, "imports": imports}))
        launch_args = {"nprocs": self.topo.nprocs, "nnodes": self.topo.nnodes, "master_addr": self.meeting.addr,
                       "master_port": self.meeting.port, "timeout": self.timeout, "modules": slurm.shipped(),
                       "heavy": pool.heavy_imported()}
        for node, agent in enumerate(slurm.lease(names), start=1):
            first = node * self.topo.nprocs
            child = Child(first, 0, agent.step, agent.conn, slurm.placeholder(), node=node, agent=agent)
            child.lines = {"stdout": LineForwarder(first, stdout, True, "stdout", prefix=""),
                           "stderr": LineForwarder(first, stderr, True, "stderr", prefix="")}
            self.children.append(child)
            agent.post(NodeLaunch(dict(launch_args, node_rank=node), payload))
            _debug("node", node, agent.name, "step", agent.step.pid)

    # ---- the supervisor thread -------------------------------------------------------------
    def _waitables(self) -> dict:
        """Everything worth waking for now, each with what to do when it is ready."""
        table = {self._control_r: self._on_control}
        if self.guard.main:
            table[self.guard.wakeup_r] = self._on_wakeup
        for c in self.children:
            for conn in c.streams:
                table[conn] = lambda c=c, conn=conn: pump(c.streams, conn)
            if c.outcome is None and not c.result_r.closed:
                table[c.result_r] = lambda c=c: self._read_result(c, block=True)
            if not c.exited:
                table[c.proc.sentinel] = lambda c=c: self._on_exit(c)
        return table

    def _supervise(self) -> None:
        try:
            self._supervise_loop()
        except BaseException as exc:  # a bug here must not leave the caller waiting forever
            self.internal_error = exc
            self.begin_stop("internal error")
            raise

    def _supervise_loop(self) -> None:
        self._drain_until = None
        while True:
            if self._drain_until is not None:
                if not any(c.streams for c in self.children) or time.monotonic() > self._drain_until:
                    break
                wait_for = max(0.0, self._drain_until - time.monotonic())
            elif self.deadline is not None and self.stop_reason is None:
                wait_for = max(0.0, self.deadline - time.monotonic())
            else:
                wait_for = None
            # A bar frame held back by the throttle (output/lines.py) is shown when it is due.
            due = next_due(fwd for c in self.children for fwd in (*c.streams.values(), *c.lines.values()))
            if due is not None:
                wait_for = max(0.0, due - time.monotonic()) if wait_for is None else \
                    min(wait_for, max(0.0, due - time.monotonic()))
            table = self._waitables()
            for obj in mpc.wait(list(table), wait_for):
                table[obj]()
            if self.deadline is not None and self.stop_reason is None and time.monotonic() >= self.deadline:
                self.begin_stop("timeout")
        for c in self.children:
            for fwd in (*c.streams.values(), *c.lines.values()):
                fwd.close()

    def _on_control(self) -> None:
        os.read(self._control_r, 64)
        if self._drain_until is None:
            self._drain_until = time.monotonic() + DRAIN_GRACE

    def _on_wakeup(self) -> None:
        if self.guard.read_wakeup():
            self.begin_stop("interrupt")

    def _read_result(self, child: Child, block: bool) -> None:
        """Take the rank's one message off its result pipe (read as soon as it is ready: a large
        result would otherwise fill the pipe and block the rank)."""
        try:
            if block or child.result_r.poll():
                message = serialize.loads(child.result_r.recv_bytes())
                if isinstance(message, Lines):  # a node's ranks' output, before its outcome
                    child.lines[message.stream].feed(message.data)
                    return
                child.outcome = message
        except (EOFError, OSError):
            child.result_r.close()
            if child.agent is not None and child.outcome is None and not child.exited:
                # Another node's process ended without an answer: its death, now, rather than at
                # its step's end, which waits for every process of the step (its forkserver may
                # be preloading torch for seconds).
                self._on_exit(child)
            return
        _debug("message from rank", child.rank, type(child.outcome).__name__)
        if child.outcome is None:  # nothing sent (a grandchild may still hold the pipe open)
            return
        if child.agent is not None:
            with self._exits:  # a node's ranks are gone once it answers; its process stays
                child.exited = True
                self._exits.notify_all()
        if child.node is not None and isinstance(child.outcome, Failed):
            # Another machine's clock: dated at its arrival, backdated as a death is (its ranks'
            # peers here may have failed from it a moment before it arrived), unless it answers
            # the stop's own Interrupt; its rank is the node's failed rank, not the node's first.
            now = time.monotonic()
            ours = self.stop_reason is not None and child.outcome.type_name == "builtins.KeyboardInterrupt"
            child.outcome.when = now if ours else now - DEATH_SLACK
            error = child.outcome.rebuild()
            add_note(error, f"mpify: on node {child.node}")
            self.record(Failure(child.outcome.rank, child.outcome.when, error, by_stop=ours))
        elif isinstance(child.outcome, Failed):
            self.record(Failure(child.rank, child.outcome.when, child.outcome.rebuild()))
        self._check_done()

    def _on_exit(self, child: Child) -> None:
        # Only this thread reads exit codes (see teardown.rank_alive). Another node's process is
        # not waited for: its channel's end may come before its step's.
        child.proc.join(0.0 if child.agent is not None else 1.0)
        _debug("rank", child.rank, "exited with", child.proc.exitcode)
        with self._exits:
            child.exited = True
            self._exits.notify_all()
        if child.outcome is None and not child.result_r.closed:
            self._read_result(child, block=False)
        if child.outcome is None:
            code = child.proc.exitcode if child.proc.exitcode is not None else -signal.SIGKILL
            if child.agent is not None and child.proc.exitcode is None:
                # Its channel ended first: srun's words on its task ("task 0: Killed") come
                # within a moment, and say how; its step's own exit code comes later.
                time.sleep(0.3)
                code = -signal.SIGKILL if "Killed" in child.agent.said() else 1
            now = time.monotonic()
            # A death by a signal that the stop sent is our doing (dated now, after the stop:
            # not a cause); any other death is backdated (see DEATH_SLACK). rank_main sends its
            # message before it returns, whole even when the stop's SIGINT comes meanwhile, so a
            # code 0 without one is a death like any other (fn's os._exit(0), say).
            ours = code < 0 and -code in self.signals_sent.get(child.proc.pid, ())
            when = now if ours else now - DEATH_SLACK
            error = RankDiedError(child.rank, code)
            if child.node is not None:
                said = child.agent.said() if child.agent is not None else ""
                add_note(error, f"mpify: node {child.node}'s step (ranks {child.rank}-"
                                f"{child.rank + self.topo.nprocs - 1}) ended without an outcome"
                                + (f"; its last words:\n{said}" if said else ""))
            self.record(Failure(child.rank, when, error, by_stop=ours))
        self._check_done()

    def _check_done(self) -> None:
        # A rank that sent its outcome counts as finished even if it is slow to exit (a
        # non-daemon thread of the user's): teardown gives it EXIT_GRACE, then stops it.
        if all(c.exited or c.outcome is not None for c in self.children):
            self._done.set()

    # ---- failures and stopping -----------------------------------------------------------
    def record(self, failure: Failure) -> None:
        _debug("failure of rank", failure.rank, type(failure.error).__name__, "at", f"{failure.when:.3f}")
        with self._lock:
            self.failures.append(failure)
        if failure.when < self.stop_time:
            self.begin_stop("failure")

    def _caller_global_rank(self) -> int | None:
        return None if self.caller_rank is None else self.topo.global_rank(self.caller_rank)

    def begin_stop(self, reason: str) -> None:
        """Stop every rank: close the store, abort the caller's rank, signal the children."""
        with self._lock:
            if self.stop_reason is not None:
                return
            self.stop_reason = reason
            self.stop_time = time.monotonic()
        _debug("stop:", reason)
        self.meeting.close()
        first = signal.SIGINT if reason in ("interrupt", "timeout") else signal.SIGTERM
        pids = [c.proc.pid for c in self.children if c.agent is None]
        for c in self.children:
            if c.agent is not None and c.outcome is None:
                c.agent.interrupt()  # the node stops its ranks with its own ladder, and answers
        self._stopper = threading.Thread(target=teardown.stop_ranks, args=(pids, first, self.signals_sent, self.pidfds),
                                         name="mpify-stopper", daemon=True)
        self._stopper.start()
        self._done.set()
        # Last, because aborting raises RankAborted in the caller's thread at its next bytecode,
        # which may be this very function. Not on an interrupt (the caller's SIGINT handler raises
        # KeyboardInterrupt already), nor when the caller's own rank failed and called us from
        # its `except` (it is unwinding already; an abort would land in its error handling).
        if (self.caller_rank is not None and reason != "interrupt"
                and threading.get_ident() != self.guard.thread_id):
            self.guard.abort_caller_rank()

    # ---- the caller's rank -----------------------------------------------------------------
    def run_caller(self, fn, args, kwargs, ctx, imports, need) -> None:
        env = rank_env(self.topo, self.caller_rank, self.meeting.addr, self.meeting.port, self.meeting.env)
        recorded = []

        def on_raise(exc: BaseException) -> None:
            # Recorded before ctx exits, as a child reports: the stop starts before this rank's
            # TorchDDPCtx destroys the group, so the ranks failing from that are not causes.
            if not isinstance(exc, (RankAborted, KeyboardInterrupt)):
                recorded.append(exc)
                self.record(Failure(self._caller_global_rank(), stamp_failure(exc), exc))

        try:
            with patched_environ(env), caller_threads(env), rendezvous.caller_group_guard():
                self.caller_value = run_rank(fn, args, kwargs, ctx, imports, need, on_raise=on_raise)
        except RankAborted as exc:
            self.kept_alive = exc
        except KeyboardInterrupt as exc:
            self.kept_alive = exc
            self.guard.interrupted.set()
            self.begin_stop("interrupt")
        except BaseException as exc:
            if not recorded:  # raised by ctx itself (enter or exit), not by fn
                self.record(Failure(self._caller_global_rank(), stamp_failure(exc), exc))

    def wait(self) -> None:
        try:
            self._done.wait()
        except KeyboardInterrupt:
            self.guard.interrupted.set()
            self.begin_stop("interrupt")

    # ---- teardown --------------------------------------------------------------------------
    def teardown(self) -> None:
        """Nothing this launch started outlives this call (another node's resident process
        outlives it, idle, its ranks gone, or is ended if it does not answer)."""
        pids = [c.proc.pid for c in self.children if c.proc.pid is not None and c.agent is None]
        nodes = [c for c in self.children if c.agent is not None]
        if self.stop_reason is None:
            # Ranks that sent their outcome are exiting by themselves; the supervisor sees them go.
            with self._exits:
                self._exits.wait_for(lambda: all(c.exited for c in self.children), EXIT_GRACE)
            teardown.stop_ranks(pids, first=signal.SIGTERM, sent=self.signals_sent, handles=self.pidfds)
            for c in nodes:
                if not c.exited:
                    c.agent.interrupt()
        elif self._stopper is not None:
            self._stopper.join()
        if nodes:
            with self._exits:
                self._exits.wait_for(lambda: all(c.exited for c in nodes), NODE_GRACE)
            for c in nodes:
                if c.outcome is None:  # did not answer: its process is ended, not kept
                    c.agent.stop()
        teardown.sweep_groups(pids, self.pidfds)
        teardown.release(self.pidfds)
        for c in self.children:
            c.alive_w.close()
        if self._supervisor is not None:
            os.write(self._control_w, b"x")
            self._supervisor.join()
        for c in self.children:
            if c.agent is not None:
                continue  # its channel and step are the resident node process's
            c.result_r.close()
            for conn in c.streams:
                conn.close()
            c.streams.clear()
            if c.proc.pid is not None and c.proc.exitcode is not None:
                c.proc.close()
        if nodes:
            from mpify.engine.slurm import agents as slurm

            slurm.give_back([c.agent for c in nodes])
        os.close(self._control_r)
        os.close(self._control_w)
        self.meeting.close()

    # ---- the outcome -----------------------------------------------------------------------
    def outcome(self) -> Any:
        if self.guard.interrupted.is_set():
            raise KeyboardInterrupt()
        if self.internal_error is not None:
            raise MpifyError("mpify's launch supervisor failed; every rank was stopped") from self.internal_error
        causes = blame_causes(self.failures, self.stop_time)
        if causes:
            first = causes[0]
            failed = sorted({f.rank for f in causes})
            _annotate(first.error, first.rank, self.topo.world_size, failed)
            raise first.error
        if self.stop_reason == "timeout":
            raise LaunchTimeoutError(f"the launch ran past its timeout of {self.timeout} s; every rank was stopped")
        values = {}  # by global rank
        if self.caller_rank is not None:
            values[self.topo.global_rank(self.caller_rank)] = self.caller_value
        for c in self.children:
            if isinstance(c.outcome, Done) and c.outcome.blob is not None:
                if c.node is not None:  # a node's ranks' values, by global rank
                    values.update(serialize.loads(c.outcome.blob))
                else:
                    values[self.topo.global_rank(c.local_rank)] = serialize.loads(c.outcome.blob)
        # A Slurm launch answers for every node's ranks; a node of a by-hand multi-node launch,
        # for its own.
        if any(c.node is not None for c in self.children):
            ranks = list(range(self.topo.world_size))
        else:
            ranks = [self.topo.global_rank(r) for r in range(self.topo.nprocs)]
        if self.gather:
            return [values.get(r) for r in ranks]
        return values.get(ranks[0])


def _annotate(exc: BaseException, rank: int, world: int, failed: list[int]) -> None:
    add_note(exc, f"mpify: raised in rank {rank} of {world}; failed ranks: {', '.join(map(str, failed))}")
    try:
        exc.mpify_rank = rank
        exc.mpify_failed_ranks = failed
    except (AttributeError, TypeError):  # exceptions with __slots__
        pass
