"""What the caller holds of a live world's ranks (world.py): one `_Member` per child rank, or
per other node of a Slurm world, and the stream its lines go to.
"""
from __future__ import annotations

import sys
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from mpify.engine.output.lines import LineGate


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
    # Another node of a Slurm world (slurm/agents.py): one member for that node's ranks (rank is its
    # first), its resident process's step the process, its channel both cmd_w and reply_r.
    node: int | None = None
    agent: Any = None
    lines: dict = field(default_factory=dict)  # that node's output: stream name -> LineForwarder
    stopped: bool = False  # its process was ended by the world (not a death to report)
    eof: bool = False  # its channel ended: its process is gone or going (its sentinel reports it)
    closed_ok: bool = False  # it answered Close: its ranks are gone, its process may be lent again

    def holds(self, rank: int, nprocs: int) -> bool:
        return rank == self.rank or (self.node is not None and self.rank <= rank < self.rank + nprocs)
