"""The TCPStore a launch hosts for its ranks, and the guard for a process group left behind.

Like torchrun, the launcher hosts torch.distributed's own TCPStore and every rank joins it as a
client: that is how a caller blocked as rank 0 in `init_process_group` learns of a dead rank at
once (see engine/rendezvous.py). Hosting needs torch, and the engine never imports torch itself,
so this module registers the host and the guard with engine/rendezvous on import; torch is
imported only inside them. A launch and a long-lived world both use it; it needs neither the
user API (ctx.py) nor the launcher.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from mpify.engine import rendezvous

DEFAULT_TIMEOUT = 1800.0  # seconds, torch's own default for init_process_group and collectives


def _port_in_use(port: int) -> rendezvous.PortInUseError:
    return rendezvous.PortInUseError(f"master port {port} is already in use on this machine; pick another "
                                     f"port, or leave MASTER_PORT unset to get a free one")


def _host_store(addr: str, port: int, world_size: int) -> tuple[Any, int]:
    """Host a TCPStore server on `port` (0: a free one) for the ranks to join as clients.

    TCPStore's own server listens on every interface; the socket is bound here instead, to
    `addr` only (127.0.0.1 for a one-machine launch, as `torchrun --standalone` does), and
    handed to the store. An address that is not this machine's (behind NAT) falls back to
    torch's way."""
    import errno
    import socket

    import torch.distributed as dist

    listen_fd = None
    try:
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((addr, port))
            sock.listen(1024)
        except BaseException:
            sock.close()
            raise
        listen_fd = sock.detach()
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise _port_in_use(port) from None
        if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT) and not isinstance(exc, socket.gaierror):
            raise
    try:
        store = dist.TCPStore(addr, port, None, True, timeout=timedelta(seconds=DEFAULT_TIMEOUT),
                              wait_for_workers=False, master_listen_fd=listen_fd)
    except dist.DistNetworkError as exc:
        if listen_fd is not None:
            os.close(listen_fd)
        if "EADDRINUSE" in str(exc) or "in use" in str(exc):
            raise _port_in_use(port) from None
        raise
    return store, store.port


@contextmanager
def _destroy_leftover_group():
    import torch.distributed as dist

    if not dist.is_available():
        yield
        return
    world = dist.distributed_c10d._world
    was = dist.is_initialized()
    count = getattr(world, "group_count", None)
    try:
        yield
    finally:
        if not was and dist.is_initialized():
            dist.destroy_process_group()
        elif not was and count is not None:
            # torch names process groups by a per-process counter that a failed
            # init_process_group has already bumped; fresh ranks count from 0, so a caller whose
            # init failed once would wait forever for keys no rank writes on the next launch.
            world.group_count = count


rendezvous.register_torch_hooks(_host_store, _destroy_leftover_group)
