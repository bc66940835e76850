"""Freeing a rank stuck in a collective whose peers will never come, without killing it.

A gloo collective waits in C++ for its peers' bytes; no signal reaches it, and neither
`ProcessGroup.abort()` nor destroying the group (here, or in the peers) makes it return on
torch 2.13: tried, the wait went on until the peers' processes exited. What does make it return
at once is its connections closing: gloo then raises "Connection closed by peer". So a stuck
rank, from a thread of its own, shuts down its gloo connections: the TCP connections between
this world's processes, less those of the rendezvous store (its port is the world's
MASTER_PORT), which init_process_group will need again when the group is rebuilt. Sockets to
anything else (a Jupyter kernel's own connections, a user's) are never touched.

The group is unusable afterwards; the world rebuilds it (see stop.py). Ranks on other machines
are not processes seen here: in a Slurm world (slurm/agents.py), connections to the other nodes'
addresses count as the world's too, less the store's and the channels that carry the world's
own commands (`keep`); a multi-node world started by hand is freed only through its local peers.
"""
from __future__ import annotations

import os
import socket
import sys
from typing import Iterable

from mpify.engine.debug import debug


def _endpoints(pids: Iterable[int]) -> set[tuple]:
    """The local (address, port) of every TCP connection the processes `pids` hold."""
    import psutil

    found = set()
    for pid in pids:
        try:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.laddr:
                    found.add(tuple(conn.laddr))
        except (psutil.Error, OSError):  # gone meanwhile
            pass
    return found


def break_pairs(world_pids: Iterable[int], store_port: int, hosts: Iterable[str] = (),
                keep: Iterable[tuple] = ()) -> int:
    """Shut down this process's TCP connections to the other world processes (but the store's),
    and to the other nodes' addresses `hosts` (but the connections in `keep`, as (local, remote)
    address pairs); returns how many. Safe to call from any thread."""
    import psutil

    me = os.getpid()
    peers = _endpoints(pid for pid in world_pids if pid != me)
    hosts, keep = set(hosts), set(keep)
    count = 0
    for conn in psutil.Process(me).net_connections(kind="tcp"):
        if conn.status != psutil.CONN_ESTABLISHED or not conn.raddr or store_port in (conn.laddr.port,
                                                                                     conn.raddr.port):
            continue
        remote = conn.raddr.ip in hosts and (tuple(conn.laddr), tuple(conn.raddr)) not in keep
        if tuple(conn.raddr) not in peers and not remote:
            continue
        try:
            # shutdown acts on the socket itself, whichever descriptor names it: gloo's own fd
            # sees the end of the stream at once. The duplicate is ours to close.
            with socket.socket(fileno=os.dup(conn.fd)) as sock:
                sock.shutdown(socket.SHUT_RDWR)
            count += 1
        except OSError:  # closed meanwhile
            pass
    _abort_nccl()
    debug("unstick: shut down", count, "connections in", me)
    return count


def _abort_nccl() -> None:
    """NCCL's communicators can be aborted by torch itself (gloo's cannot: see above). Not yet
    run on a GPU."""
    c10d = sys.modules.get("torch.distributed.distributed_c10d")
    if c10d is None or not c10d.is_initialized():
        return
    try:
        if c10d.get_backend() == "nccl":
            c10d._abort_process_group()
    except Exception as exc:  # the group is being torn down anyway
        debug("unstick: nccl abort:", exc)
