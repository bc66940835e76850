"""A live world's rounds: one command to some ranks (the caller among them or not), every reply
waited for, each rank's value or the failure that stopped the round (world.py's `World` is made
of this, stop.py and supervisor.py).
"""
from __future__ import annotations

import sys
import threading
from typing import Any, Callable, Iterable

from mpify.engine.args import serialize
from mpify.engine.launch.blame import Failure, causes as blame_causes
from mpify.engine.debug import debug as _debug
from mpify.engine.errors import LaunchBusyError, WorldClosedError, add_note
from mpify.engine.launch.interrupts import InterruptGuard, RankAborted
from mpify.engine.launch.ranch import _gated
from mpify.engine.launch.supervisor import _annotate
from mpify.engine.messages import Done, Failed
from mpify.engine.output.lines import close_gates, gates
from mpify.engine.rank import groups
from mpify.engine.rank.child import _in_fn, stamp_failure
from mpify.engine.world.members import _Member


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


class Rounds:
    """The rounds of `World` (a part of it: its state is World's)."""

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
            # As every rank does after each cell (rank.py). A default group spans every
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
