"""How a live world's round stops, and the world's group rebuilt after a break.

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

import os
import signal
import socket
import threading
import time
from contextlib import ExitStack

from mpify.engine import rendezvous
from mpify.engine.args import serialize
from mpify.engine.debug import debug as _debug
from mpify.engine.env import LAUNCH_PORT_VAR
from mpify.engine.launch import teardown
from mpify.engine.messages import Failed, MeetAt, Rebuild
from mpify.engine.rank.child import rank_scope
from mpify.engine.world.members import _Member
from mpify.engine.world.rank import destroy_groups
from mpify.engine.world.rounds import _Round
from mpify.engine.world.unstick import break_pairs

ASK_GRACE = 1.0  # seconds for busy ranks to return to Python after SIGINT / RankAborted
BREAK_GRACE = 5.0  # seconds for stuck ranks to come back once their peers destroyed their groups
START_TIMEOUT = 600.0  # seconds for every rank to start and enter ctx (torch's own init timeout is longer)


class Stopping:
    """The ladder and the rebuild of `World` (a part of it: its state is World's)."""

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
                                sent=self._signals_sent, handles=self._pidfds)

    def _free_rank0(self) -> bool:
        """Shut down the caller's connections to the other ranks (see unstick.py)."""
        try:
            break_pairs(self._pids(), self.meeting.port, self.remote_hosts, self._channels())
            return True
        except Exception as exc:  # psutil cannot see them: the ladder goes on to its next step
            _debug("world: freeing rank 0:", exc)
            return False

    def _channels(self) -> list[tuple]:
        """The other nodes' channels (slurm/agents.py), as (local, remote) address pairs: never shut down
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
        teardown.signal_alone(member.proc.pid, sig, self._pidfds)  # through its pidfd (launch/teardown.py)

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
