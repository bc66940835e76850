"""Which of a launch's failures caused its stop, and which only followed from another rank's.

When one rank dies or leaves a collective, the ranks waiting on it fail too: gloo raises
"Connection closed by peer" (or "reset by peer") in each of them. Every failure is dated (an
exception when fn raised it, in its own process; a death when the caller saw it, minus
DEATH_SLACK), and the failures dated before the stop began are its causes.

Dates alone mislead on a loaded machine: a death is seen only when the rank's parent (the
forkserver) has reaped it and told the caller, which can come a second after its peers raised
their lost connections. So a peer's lost connection is a cause only when nothing else is: a
timely failure of another kind wins, and when there is none, a death the stop did not cause wins
however late it was seen. Two ranks raising the same bug at once are both causes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from mpify.engine.errors import RankDiedError, RemoteTraceback

# What torch.distributed's backends say in a rank whose peer went away (gloo's tcp pair, NCCL).
_PEER_LOSS = re.compile(r"Connection (closed|reset) by peer|Broken pipe|remote process exited")


@dataclass
class Failure:
    rank: int
    when: float
    error: BaseException
    by_stop: bool = False  # a death from a signal the stop sent


def is_peer_loss(exc: BaseException) -> bool:
    """`exc`, or an error it was raised from (a user's wrapper), says a peer went away. A child
    rank's error carries its traceback text as `__cause__`, chain included."""
    seen = 0
    while exc is not None and seen < 8:
        text = exc.text if isinstance(exc, RemoteTraceback) else str(exc)
        if _PEER_LOSS.search(text):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def causes(failures: list[Failure], stop_time: float) -> list[Failure]:
    """The failures to report, first one first (empty when nothing failed before the stop)."""
    timely = [f for f in failures if f.when <= stop_time]
    own = [f for f in timely if not is_peer_loss(f.error)]
    if not own and timely:
        own = [f for f in failures if isinstance(f.error, RankDiedError) and not f.by_stop]
    return sorted(own or timely, key=lambda f: f.when)
