"""The rank environment: torchrun's variable names, so `init_process_group()` needs no arguments.

Each rank sees RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK, NODE_RANK, ROLE_RANK,
ROLE_WORLD_SIZE, MASTER_ADDR and MASTER_PORT as strings, exactly as torchrun sets them. The
caller's own os.environ is changed only while it runs rank 0, and put back exactly afterwards.

Threads, as torchrun does: when several ranks share this machine (nprocs > 1) and the user has
not set OMP_NUM_THREADS, every rank gets OMP_NUM_THREADS=1, or N ranks would each start a pool
of one thread per core and fight over the cores (the DDP workload, 4 ranks on 2 cores, as measured
when issue 17 was filed: 0.36 s against 0.30 s; not reproduced since on a loaded machine). A rank forked from a forkserver that had imported torch already holds torch's
pool, sized when torch was imported, so the variable alone would come too late: torch's pool is
set to follow it (`follow_threads`). In the caller, torch's thread count is put back afterwards.
This module never imports torch: it acts only where the process has imported it.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Mapping


LAUNCH_PORT_VAR = "MPIFY_LAUNCH_PORT"
THREADS_VAR = "OMP_NUM_THREADS"
# What a live world holds in the caller's os.environ for its life, beyond the rendezvous
# variables ({name: value}): the forkserver's signature (start/pool.py) must not take mpify's own
# OMP_NUM_THREADS=1 for the user's change, or a launch beside the world, and the one after it
# closes, would each restart the forkserver.
held: dict[str, str] = {}


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
    if topo.nprocs > 1 and THREADS_VAR not in os.environ:
        env[THREADS_VAR] = "1"  # torchrun's rule (see above); a user's own value is kept
    env.update(extra)
    return env


def follow_threads() -> None:
    """Size torch's intra-op pool from OMP_NUM_THREADS, as a fresh `import torch` would, where
    torch was imported before the variable was set (a rank forked from the forkserver)."""
    torch = sys.modules.get("torch")
    want = _threads_wanted()
    if torch is not None and want is not None and torch.get_num_threads() != want:
        torch.set_num_threads(want)


def _threads_wanted() -> int | None:
    try:
        want = int(os.environ.get(THREADS_VAR, ""))
    except ValueError:  # unset, or a value OpenMP itself would ignore ("4,2", "")
        return None
    return want if want > 0 else None


@contextmanager
def caller_threads(env: Mapping[str, str]) -> Iterator[None]:
    """While the caller runs a rank with `env`: torch's pool follows the OMP_NUM_THREADS that
    mpify set there (not one the user set: the caller's pool is the user's own choice), and
    afterwards it is put back."""
    if THREADS_VAR not in env:
        yield
        return
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        follow_threads()
        yield
    finally:
        torch = sys.modules.get("torch")
        if torch is not None:
            # Imported during the launch, torch sized its pool from our "1": give it what a
            # fresh import gives without the variable. On Linux that is libgomp's default, the
            # CPUs this process may run on (measured: `taskset -c 0` gives 1).
            torch.set_num_threads(before if before is not None else _cpus())


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


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
