"""A live world's supervisor thread: every rank's output, replies and exit, all the time.

Threads in the caller while a world lives:
- the supervisor reads every rank's output, replies and exit, all the time (a rank never blocks
  on a full pipe, even between rounds), and during a round the SIGINT wakeup pipe;
- during a round's stop, a stopper walks the ladder below, so the supervisor keeps reading.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

import multiprocess.connection as mpc

from mpify.engine.args import serialize
from mpify.engine.launch.blame import Failure
from mpify.engine.debug import debug as _debug
from mpify.engine.errors import MpifyError, RankDiedError, WorldClosedError, add_note
from mpify.engine.launch import teardown
from mpify.engine.launch.supervisor import DEATH_SLACK
from mpify.engine.messages import Failed, Lines, NodeLost
from mpify.engine.output.lines import next_due, pump
from mpify.engine.world.members import _CurrentStream, _Member
from mpify.engine.world.rounds import _Round
from mpify.engine.world.stop import ASK_GRACE


class Supervisor:
    """The supervisor thread of `World` (a part of it: its state is World's)."""

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
        rnd = self._round
        # A rank whose start failed (its ctx raised on entering) reports that, then leaves the
        # world by itself: its exit is not a second failure, whichever the supervisor sees first
        # (a stop of the other ranks' start could come between the two).
        left = rnd is not None and rnd.starting and any(f.rank == member.rank for f in rnd.failures)
        ours = code < 0 and -code in self._signals_sent.get(member.proc.pid, ()) or member.stopped or left
        death = RankDiedError(member.rank, code)
        if member.node is not None:
            said = member.agent.said()
            add_note(death, f"mpify: node {member.node}'s process (ranks {member.rank}-"
                            f"{member.rank + self.topo.nprocs - 1}) ended" + (f"; its last words:\n{said}" if said else ""))
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
        teardown.stop_ranks(pids, first=signal.SIGTERM, sent=self._signals_sent, handles=self._pidfds)
        self.closed = True
        rnd = self._round
        if rnd is not None:
            with rnd.cond:
                rnd.cond.notify_all()
