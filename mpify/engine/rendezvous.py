"""Where the ranks meet: MASTER_ADDR/MASTER_PORT, and who hosts torch's TCPStore there.

Like torchrun, the launcher hosts torch.distributed's own TCPStore and every rank joins it as a
client (TORCHELASTIC_USE_AGENT_STORE=True). That is what lets the caller learn of a dead rank
within seconds: when the caller is rank 0 and blocked inside `init_process_group` waiting for a
rank that will never arrive, the supervisor closes the store and the blocked call fails at once
(a signal cannot interrupt that wait: it is a C++ polling loop). Hosting needs torch, so the engine
only calls a host registered by mpify.torchddp.store, and only when torch is already imported by the
caller (or the launch asks for it); otherwise rank 0 hosts the store itself, as torch does by
default, and a free port is chosen here.
"""
from __future__ import annotations

import functools
import ipaddress
import os
import socket
import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from mpify.engine.env import LAUNCH_PORT_VAR
from mpify.engine.errors import MpifyError

DEFAULT_ADDR = "127.0.0.1"


class PortInUseError(MpifyError, OSError):
    """The master port asked for is taken on this machine."""


# Registered by mpify.torchddp.store, so that this module never imports torch itself:
# host(addr, port, world_size) -> (store, actual_port), and a context manager factory wrapped
# around the caller's rank that destroys a default process group fn left initialised there.
_store_host: Optional[Callable[[str, int, int], tuple[Any, int]]] = None
_group_guard: Optional[Callable[[], Any]] = None


def register_torch_hooks(host: Callable[[str, int, int], tuple[Any, int]], group_guard: Callable[[], Any]) -> None:
    global _store_host, _group_guard
    _store_host, _group_guard = host, group_guard


def caller_group_guard():
    """Around the caller's rank: a default process group that fn initialised and did not destroy
    (it raised, or was aborted) is destroyed, so the notebook can launch again."""
    if _group_guard is None or "torch.distributed" not in sys.modules:
        return nullcontext()
    return _group_guard()


@dataclass
class Meeting:
    """The address the ranks meet at, and the store the launcher hosts there (if any)."""

    addr: str
    port: int
    store: Any = None
    env: dict = field(default_factory=dict)

    def close(self) -> None:
        """Drop the hosted store: its server stops and every client blocked on it fails."""
        self.store = None


# What _agent_env sets in the ranks (and in the caller while it runs rank 0 or a world lives).
AGENT_ENV_NAMES = ("TORCHELASTIC_USE_AGENT_STORE", "TORCH_DIST_INIT_BARRIER")


def _agent_env() -> dict:
    """What the ranks need to join a store the launcher hosts, as under torchrun's agent.

    TORCH_DIST_INIT_BARRIER=1 (unless the user set it): init_process_group ends with a barrier
    on the store. Without it a rank can finish init, fail and die while another is still
    connecting to it inside gloo's init, which retries a refused connection for the whole
    timeout (30 min by default) where no signal and no closed store can reach it."""
    return {"TORCHELASTIC_USE_AGENT_STORE": "True",
            "TORCH_DIST_INIT_BARRIER": os.environ.get("TORCH_DIST_INIT_BARRIER", "1")}


def _is_loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(socket.gethostbyname(addr)).is_loopback
    except (OSError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _loopback_interface() -> str | None:
    """The name of the interface that holds 127.0.0.1 ("lo" on Linux, "lo0" on macOS)."""
    try:
        import psutil
        for name, addrs in psutil.net_if_addrs().items():
            if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addrs):
                return name
    except Exception:  # psutil cannot read the interfaces here: gloo picks its own
        pass
    return None


def _local_env(addr: str, nnodes: int) -> dict:
    """A one-machine launch at a loopback address: gloo listens on the loopback interface too
    (by default it binds to whatever the hostname resolves to, often a public interface). The
    user's own GLOO_SOCKET_IFNAME wins."""
    if nnodes > 1 or "GLOO_SOCKET_IFNAME" in os.environ or not _is_loopback(addr):
        return {}
    name = _loopback_interface()
    return {"GLOO_SOCKET_IFNAME": name} if name else {}


def free_port(addr: str = "") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError as exc:
            raise PortInUseError(f"master port {port} is already in use on this machine ({exc.strerror}); "
                                 f"pick another port, or leave MASTER_PORT unset to get a free one") from None


def meet(master_addr: str | None, master_port: int | None, world_size: int, node_rank: int,
         nnodes: int, want_store: bool) -> Meeting:
    """Decide the address and port, and host the store when this launcher should.

    The port is the caller's `master_port`, else MASTER_PORT from os.environ, else a free one.
    Node 0 hosts; other nodes' ranks join node 0's store."""
    addr = master_addr or os.environ.get("MASTER_ADDR") or DEFAULT_ADDR
    env_port = os.environ.get("MASTER_PORT", "")
    if env_port == os.environ.get(LAUNCH_PORT_VAR):  # set by the launch this one is nested in
        env_port = ""
    port = master_port if master_port is not None else int(env_port or 0)
    host = _store_host if (want_store or nnodes > 1 or "torch" in sys.modules) else None
    local = _local_env(addr, nnodes)
    if host is not None and node_rank == 0:
        store, port = host(addr, port, world_size)
        return Meeting(addr, port, store, {**_agent_env(), **local})
    if nnodes > 1:
        if not port:
            raise ValueError("a multi-node launch needs master_port (or MASTER_PORT) on every node")
        # Node 0's launcher hosts the store (torch is required for multi-node launches).
        return Meeting(addr, port, None, _agent_env())
    if port:
        _check_port_free(port)
        return Meeting(addr, port, env=local)
    return Meeting(addr, free_port(), env=local)
