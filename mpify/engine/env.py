"""The rank environment: torchrun's variable names, so `init_process_group()` needs no arguments.

Each rank sees RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK, ROLE_RANK,
ROLE_WORLD_SIZE, MASTER_ADDR and MASTER_PORT as strings, exactly as torchrun sets them. The
caller's own os.environ is changed only while it runs rank 0, and put back exactly afterwards.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping


LAUNCH_PORT_VAR = "MPIFY_LAUNCH_PORT"


@dataclass(frozen=True)
class Topology:
    """Where the ranks of one launch sit: nprocs per node, nnodes nodes, this node's rank."""

    nprocs: int
    nnodes: int = 1
    node_rank: int = 0

    @property
    def world_size(self) -> int:
        return self.nprocs * self.nnodes

    def global_rank(self, local_rank: int) -> int:
        return self.node_rank * self.nprocs + local_rank


def rank_env(topo: Topology, local_rank: int, master_addr: str, master_port: int,
             extra: Mapping[str, str] = ()) -> dict[str, str]:
    """The variables one rank gets on top of the caller's environment."""
    rank = topo.global_rank(local_rank)
    env = {
        "RANK": str(rank),
        "LOCAL_RANK": str(local_rank),
        "WORLD_SIZE": str(topo.world_size),
        "LOCAL_WORLD_SIZE": str(topo.nprocs),
        "GROUP_RANK": str(topo.node_rank),
        "NODE_RANK": str(topo.node_rank),
        "ROLE_RANK": str(rank),
        "ROLE_WORLD_SIZE": str(topo.world_size),
        "MASTER_ADDR": master_addr,
        "MASTER_PORT": str(master_port),
        # Tells a launch nested in this rank that MASTER_PORT is this launch's, not the user's
        # choice: the nested one takes a free port of its own (rendezvous.meet).
        LAUNCH_PORT_VAR: str(master_port),
    }
    env.update(extra)
    return env


@contextmanager
def patched_environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set `values` in os.environ for the block; afterwards os.environ is exactly as before,
    including variables the block itself added, changed or removed."""
    before = dict(os.environ)
    os.environ.update(values)
    try:
        yield
    finally:
        restore_environ(before)


def restore_environ(before: Mapping[str, str]) -> None:
    """Make os.environ equal `before` (through os.environ, so putenv/unsetenv follow)."""
    for key in [k for k in os.environ if k not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value
