"""What travels between the caller and its ranks: one small named type per message.

A launch's rank sends one outcome (`Done` or `Failed`) and exits. A live world's rank (see
world/rank.py) stays and answers commands, one reply per command, until `Close`. Every message is
pickled with the engine's serializer (dill) over a pipe that only the caller and that rank hold,
or, to another node's resident process (slurm/agents.py), over a socket that passed the HMAC challenge
of the launch's secret before anything on it is unpickled.
"""
from __future__ import annotations

import traceback
from dataclasses import dataclass

from mpify.engine.args import serialize
from mpify.engine.errors import RankRaisedError, RemoteTraceback


# ---- outcomes: what a rank answers ---------------------------------------------------------
@dataclass
class Done:
    """The rank finished; `blob` is its pickled value, or None when the caller did not ask."""

    rank: int
    when: float  # CLOCK_MONOTONIC, comparable across the machine's processes
    blob: bytes | None = None


@dataclass
class Failed:
    """The rank raised. The exception travels pickled when it can be rebuilt, and always as its
    type name, message and formatted traceback, so the caller can say what happened even when
    the type exists only in the rank."""

    rank: int
    when: float
    blob: bytes | None
    type_name: str
    text: str
    tb_text: str

    @classmethod
    def of(cls, rank: int, exc: BaseException, when: float) -> "Failed":
        # The traceback travels as text (shown by the caller as the exception's cause), not as
        # rebuilt frames: IPython draws a rebuilt frame's source from a stub code object and
        # points at the wrong line.
        text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        try:
            blob = serialize.dumps(exc.with_traceback(None))
            serialize.loads(blob)  # what cannot be rebuilt here cannot be rebuilt in the caller either
        except Exception:
            blob = None
        return cls(rank, when, blob, f"{type(exc).__module__}.{type(exc).__qualname__}", str(exc), text)

    def rebuild(self) -> BaseException:
        """The rank's exception with its original type and remote traceback, or RankRaisedError."""
        if self.blob is not None:
            try:
                exc = serialize.loads(self.blob)
                if isinstance(exc, BaseException):
                    exc.__cause__ = RemoteTraceback(self.tb_text)  # the whole traceback, chain included
                    return exc
            except Exception:  # the type exists only in the rank: report it by name below
                pass
        err = RankRaisedError(self.rank, self.type_name, self.text, self.tb_text)
        err.__cause__ = RemoteTraceback(self.tb_text)
        return err


# ---- a live world's commands: what the caller asks a rank -----------------------------------
@dataclass
class Call:
    """Run a function: `blob` is (fn, args, kwargs, extra) as a launch pickles it (big arrays
    through shared memory). `send_result`: whether the caller wants the value back."""

    blob: bytes
    send_result: bool


@dataclass
class Exec:
    """Run source text in the rank's own persistent namespace (its `__main__`). `echo`: print the
    value of a last expression, as a notebook shows it."""

    source: str
    filename: str
    echo: bool = True
    ranks: list | None = None  # to another node's process: which of its ranks run it (None: all)


@dataclass
class Push:
    """Bind names in the rank's namespace: `blob` holds a dict, pickled as a launch is."""

    blob: bytes


@dataclass
class Pull:
    """Send back the value bound to `name` in the rank's namespace."""

    name: str
    rank: int | None = None  # to another node's process: which of its ranks


@dataclass
class Status:
    """Report pid, device and memory."""


@dataclass
class MeetAt:
    """Set `env` (MASTER_PORT) before the next command, with no reply: the group a cell destroyed
    is made again at a new store (see Rebuild for why), as torchrun's restarts meet anew."""

    env: dict


@dataclass
class Rebuild:
    """Leave the world's ctx and enter it again (a new default group, same namespaces), with
    `env` set first: the new group meets at a new store (a destroyed group's keys stay in the old
    one, and a group rebuilt under the same name would read its peers' stale addresses there)."""

    env: dict


@dataclass
class Close:
    """Leave the world's ctx and exit."""


# ---- another node's resident process (slurm/node.py): what the caller asks it -----------------
@dataclass
class NodeLaunch:
    """Run one launch's ranks of this node (`args`: nprocs, nnodes, node_rank, master address
    and port...; `payload`: fn, args, kwargs and extras, pickled without shared memory, which
    does not cross machines). Answered by `Lines` while it runs, then one `Done` (a dict of each
    rank's value by global rank) or `Failed`."""

    args: dict
    payload: bytes


@dataclass
class NodeWorld:
    """Start this node's ranks of a live world (`ctx_blob`: its ctx, pickled); answered as a
    launch is. The world's commands (Call, Exec, Push, Pull, Status) follow, one reply each,
    until `Close`, answered by `Done` once the node's ranks have left ctx and exited."""

    args: dict
    ctx_blob: bytes


@dataclass
class Interrupt:
    """Stop what the node runs now, as Ctrl-C stops a launch or a world's round: its ranks are
    asked, freed or killed by the node's own ladder, and the node answers with what happened."""


@dataclass
class Lines:
    """Output of a node's ranks, already cut into lines and prefixed `[rank N] ` on the node;
    sent on the channel before the outcome that follows it, so nothing arrives late."""

    stream: str  # "stdout" or "stderr"
    data: bytes


@dataclass
class NodeLost:
    """The node's world closed itself (a rank of it died or stayed stuck); `text` says why."""

    text: str
