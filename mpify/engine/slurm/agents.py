"""A launch past one machine through Slurm: the other nodes' ranks start as `srun` steps of the
allocation the caller runs in, the caller (the kernel) staying rank 0 on node 0.

Why Slurm and not anything of our own: the users who outgrow one box sit on a Slurm cluster,
often in a notebook inside an allocation (`salloc -N 2`, Open OnDemand). Slurm places, starts,
signals and cleans up the processes; torch.distributed does the collectives; mpify stays what it
is on one machine. For each other node, one step (`srun --overlap -N1 -w NODE`) runs a resident
node process (node.py, an `Agent` here), started by the first launch or world that needs
the node and lent to one at a time: it runs that node's ranks with the engine's own multi-node
`ranch` or `World` (node_rank, master_addr, master_port) and answers with their outcome. To the
caller's Launch a node is one more child (`Child.node`), to a World one more member: its step
is the process the supervisor watches (its exit, or its channel's end, is the node's death), and
its authenticated connection carries the node's ranks' lines, already `[rank N]`-prefixed,
then the outcome.

The channel is a network socket, so it is authenticated: a secret made per start of node processes
reaches them through srun's environment (never a command line), and multiprocess's
`Listener(authkey=...)` runs its HMAC challenge, both ways, before anything is read; a connection
without the secret is refused and nothing of it is unpickled. It listens on the address of the
caller's node that Slurm's node name resolves to, not on every interface. Nothing assumes a
shared filesystem: the payload travels over the channel (dill; modules by name must import on
every node, the same environment path).
"""
from __future__ import annotations

import atexit
import os
import secrets
import select
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from mpify.engine.args import serialize
from mpify.engine.errors import MpifyError
from mpify.engine.messages import Interrupt

SECRET_VAR = "MPIFY_SLURM_SECRET"
ADDRESS_VAR = "MPIFY_SLURM_ADDRESS"
# How long the node processes may take to call back (srun's step start and their imports).
CONNECT_TIMEOUT = 120.0


# module name -> (source text, the caller's path of it), for the node processes (ship_modules)
_shipped: dict[str, tuple[str, str]] = {}


@contextmanager
def ship_modules(modules: dict[str, tuple[str, str]]) -> Iterator[None]:
    """Within the block, a Slurm launch sends these modules' text along (each node writes them in a
    private folder on its sys.path before anything is unpickled): `mpify run` imports the
    notebook's slice from a temp folder of its own, which no other machine has. The caller's path
    travels too: a node's traceback names it, so `mpify run` maps its frames to notebook cells."""
    _shipped.update(modules)
    try:
        yield
    finally:
        for name in modules:
            _shipped.pop(name, None)


def shipped() -> dict[str, tuple[str, str]]:
    return dict(_shipped)


class SlurmLaunchError(MpifyError, RuntimeError):
    """A Slurm launch could not start: no allocation, too few nodes, srun failed or a node did
    not call back."""


@dataclass
class Nodes:
    """The allocation as the caller sees it: its node names in Slurm's order, the caller's node."""

    names: list[str]
    here: str

    @classmethod
    def of_allocation(cls) -> "Nodes":
        if "SLURM_JOB_ID" not in os.environ:
            raise SlurmLaunchError("launcher='slurm' runs inside a Slurm allocation (SLURM_JOB_ID is not set): "
                                   "start the notebook or script under salloc, sbatch or srun")
        nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
        names = _hostnames(nodelist)
        here = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
        if here not in names:
            raise SlurmLaunchError(f"this process runs on {here!r}, which is not a node of job "
                                   f"{os.environ['SLURM_JOB_ID']} ({', '.join(names)}); run the caller on one of them")
        return cls(names, here)

    def others(self, count: int) -> list[str]:
        rest = [n for n in self.names if n != self.here]
        if count > len(rest):
            raise SlurmLaunchError(f"nnodes={count + 1} but the allocation has {len(self.names)} node(s): "
                                   f"{', '.join(self.names)}")
        return rest[:count]


def _hostnames(nodelist: str) -> list[str]:
    """Slurm's compact node list (`n[1-3],gpu7`) as names, expanded by Slurm itself."""
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        raise SlurmLaunchError("scontrol is not on PATH: launcher='slurm' needs Slurm's commands")
    out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
    if out.returncode:
        raise SlurmLaunchError(f"scontrol show hostnames {nodelist!r} failed: {out.stderr.strip()}")
    return out.stdout.split()


def node_address(name: str) -> str:
    """The address Slurm's name for this node resolves to: where the store and channel listen."""
    try:
        return socket.gethostbyname(name)
    except OSError as exc:
        raise SlurmLaunchError(f"the node name {name!r} does not resolve here ({exc})") from None


class Step:
    """One `srun` step as the launch's supervisor sees a rank's process (pid, sentinel, join,
    exitcode, close): a Popen, with a pidfd as the sentinel that becomes readable at its exit."""

    def __init__(self, popen: subprocess.Popen):
        self.popen = popen
        self.pid = popen.pid
        self.sentinel = os.pidfd_open(popen.pid)

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        if self.sentinel is not None:
            os.close(self.sentinel)
            self.sentinel = None


class _Placeholder:
    """A node has no alive pipe or breaker pipe of its own: its process ends with the caller's
    channel, and frees its ranks with its own ladder (an Interrupt)."""

    def close(self) -> None:
        pass

    def send_bytes(self, data: bytes) -> None:
        pass


class Agent:
    """One node's resident process (node.py) as the caller holds it: its srun step, its
    authenticated channel, and the tail of its step's own stderr (anything its ranks did not
    write: an import error, a crash), kept for the error that names the node.

    Resident, as a forkserver is: started by the first Slurm launch or world that needs the node,
    lent to one launch or world at a time, kept warm between them (its own forkserver ready), and
    stopped at exit, by `shutdown`, or with the caller (its channel's end)."""

    def __init__(self, name: str, step: Step, conn):
        self.name = name
        self.step = step
        self.conn = conn
        self.tail: deque[str] = deque(maxlen=40)
        self.ended = False  # stopped by the caller: never lent again
        self._drain = threading.Thread(target=self._drain_stderr, name=f"mpify-agent-{name}", daemon=True)
        self._drain.start()

    def _drain_stderr(self) -> None:
        # Read all the time: a full pipe would block the node process.
        for raw in iter(self.step.popen.stderr.readline, b""):
            self.tail.append(raw.decode(errors="replace").rstrip("\n"))

    def alive(self) -> bool:
        return not self.ended and self.step.exitcode is None and not self.conn.closed

    def send(self, message: Any) -> None:
        self.conn.send_bytes(serialize.dumps(message))

    def read(self) -> Any:
        return serialize.loads(self.conn.recv_bytes())

    def post(self, message: Any) -> None:
        """Send, where a process that died meanwhile is not an error here: its step's exit (the
        sentinel a launch or a world watches) reports it."""
        try:
            self.send(message)
        except (OSError, ValueError):
            pass

    def interrupt(self) -> None:
        self.post(Interrupt())

    def said(self) -> str:
        return "\n".join(self.tail)

    def stop(self, grace: float = 0.0) -> None:
        """End the channel (the node process stops its work and exits), then the step. The
        channel is shut down, not closed, and the step's sentinel stays open: a launch's or a
        world's supervisor may be waiting on both right now, and sees the end as it would a
        death; `forget` closes them once nobody waits. `grace`: how long it may take to exit by
        itself (at shutdown; a process stopped because it died or hangs gets none)."""
        self.ended = True
        try:
            with socket.socket(fileno=os.dup(self.conn.fileno())) as sock:
                sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # closed already
            pass
        if grace:
            self.step.join(grace)
        stop_step(self.step, close=False)

    def forget(self) -> None:
        with _pool_lock:
            for pool in (_agents, _idle):
                if self in pool:
                    pool.remove(self)
        self.conn.close()
        self.step.close()


_agents: list[Agent] = []  # every node process started and not stopped
_idle: list[Agent] = []  # those no launch or world holds now
_pool_lock = threading.Lock()
STOP_GRACE = 2.0  # seconds for a node process to exit once its channel closed, before its step is ended


def lease(names: list[str]) -> list[Agent]:
    """A node process on each of `names` (in that order), lent until `give_back`: an idle one
    kept from an earlier launch, or one started now (the starts in parallel). On any failure every
    process started here is stopped before the error is raised."""
    found: dict[str, Agent] = {}
    dead = []
    with _pool_lock:
        for agent in list(_idle):
            if agent.name in names and agent.name not in found:
                _idle.remove(agent)
                if agent.alive():
                    found[agent.name] = agent
                else:
                    dead.append(agent)
    for agent in dead:
        agent.stop()
        agent.forget()
    missing = [n for n in names if n not in found]
    if missing:
        try:
            started = _start_agents(missing)
        except BaseException:
            give_back(list(found.values()))
            raise
        found.update({a.name: a for a in started})
    return [found[n] for n in names]


def give_back(agents: list[Agent]) -> None:
    """Back to the pool, warm; a node process that died or was stopped is forgotten (its
    channel and sentinel closed: whoever lent it no longer waits on them)."""
    for agent in agents:
        if agent.alive():
            with _pool_lock:
                if agent in _agents:
                    _idle.append(agent)
        else:
            agent.stop()
            agent.forget()


def shutdown() -> None:
    """Stop every node process (at exit, and by mpify's shutdown)."""
    with _pool_lock:
        agents = list(_agents)
    for agent in agents:
        agent.ended = True
        agent.conn.close()  # all at once: each exits on its channel's end
    for agent in agents:
        agent.stop(STOP_GRACE)
        agent.forget()


atexit.register(shutdown)


def _start_agents(names: list[str]) -> list[Agent]:
    """One step per node of `names`, each running node.py, each calling back."""
    addr = node_address(Nodes.of_allocation().here)
    listener, secret = open_channel(addr)
    steps: list[tuple[str, int, Step]] = []
    try:
        env = dict(os.environ, **{SECRET_VAR: secret.hex(), ADDRESS_VAR: f"{addr}:{listener.address[1]}"})
        srun = shutil.which("srun") or "srun"
        for i, name in enumerate(names):
            cmd = [srun, "--overlap", "-N1", "-n1", "-w", name, "--job-name", f"mpify-node-{name}",
                   sys.executable, "-u", "-m", "mpify.engine.slurm.node"]
            popen = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, process_group=0)
            steps.append((name, i, Step(popen)))
        conns = _accept(listener, steps)
    except BaseException:
        for _, _, step in steps:
            stop_step(step)
        raise
    finally:
        listener.close()
    agents = [Agent(name, step, conns[name]) for name, _, step in steps]
    with _pool_lock:
        _agents.extend(agents)
    return agents


def open_channel(addr: str) -> tuple[Any, bytes]:
    """A listener on `addr` (a free port) whose connections must prove they hold the secret made
    here (multiprocess's HMAC challenge, both ways) before accept returns them."""
    from multiprocess.connection import Listener

    secret = secrets.token_bytes(32)
    return Listener((addr, 0), authkey=secret), secret


def _accept(listener, steps) -> dict[str, Any]:
    """Each node process's connection, by node name, once it passed the challenge. A connection
    that fails it is dropped unread; a step that exits first is an error with its stderr."""
    from multiprocess.connection import AuthenticationError

    conns: dict[str, Any] = {}
    wanted = {name for name, _, _ in steps}
    deadline = time.monotonic() + CONNECT_TIMEOUT
    # multiprocess's Listener has no timeout of its own; its socket is waited on here so that a
    # step that died before calling back is seen, and the wait is bounded.
    sock = listener._listener._socket
    while wanted - set(conns):
        for name, node, step in steps:
            if name not in conns and step.exitcode is not None:
                err = step.popen.stderr.read().decode(errors="replace").strip()
                raise SlurmLaunchError(f"the step for node {node} ({name}) exited with {step.exitcode} before "
                                       f"calling back: {err or '(no output)'}")
        if time.monotonic() > deadline:
            missing = ", ".join(sorted(wanted - set(conns)))
            raise SlurmLaunchError(f"node(s) {missing} did not call back within {CONNECT_TIMEOUT:.0f} s")
        if not select.select([sock], [], [], 0.2)[0]:
            continue
        try:
            conn = listener.accept()  # the HMAC challenge, both ways, before anything is read
        except (AuthenticationError, OSError, EOFError):
            continue  # without the secret: refused, nothing of it unpickled
        try:
            if not conn.poll(10):
                conn.close()
                continue
            name = conn.recv_bytes(256).decode()
        except (OSError, EOFError):
            conn.close()
            continue
        if name in wanted and name not in conns:
            conns[name] = conn
        else:
            conn.close()
    return conns


def stop_step(step: Step, grace: float = 5.0, close: bool = True) -> None:
    """End a step: SIGTERM to srun (which forwards it and ends the step), SIGKILL after `grace`;
    `close`: its sentinel too."""
    for sig, wait in ((15, grace), (9, 5.0)):
        if step.popen.poll() is not None:
            break
        try:
            os.killpg(step.pid, sig)
        except ProcessLookupError:
            break
        step.join(wait)
    if close:
        step.close()


def placeholder() -> _Placeholder:
    return _Placeholder()
