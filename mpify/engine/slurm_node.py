"""The node process of a Slurm launch (slurm.py): one per other node, started by `srun` there.

It calls the caller back over the authenticated channel (the secret and address come in its
environment from srun, and leave it at once, so its ranks never hold them), receives the launch,
runs that node's ranks with the engine's own multi-node `ranch` (every rank a child of this
process, node_rank from the caller), and answers with one message: `Done` (each rank's value, by
global rank) or `Failed` (the first failure, with its rank). Its ranks' lines go, prefixed, to its
stdout and stderr, which srun carries to the caller. If the caller goes, the channel closes; if
the step is cancelled, srun's SIGTERM ends this process, and its ranks follow it (their watchdogs).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time


def main() -> int:
    from multiprocess.connection import Client

    from mpify.engine import serialize, starter
    from mpify.engine.launch import ranch
    from mpify.engine.errors import RemoteTraceback
    from mpify.engine.messages import Done, Failed
    from mpify.engine.slurm import ADDRESS_VAR, SECRET_VAR

    # One launch, then this process exits: no forkserver started for launches to come (it would
    # import torch for nobody, and the step lasts until every process of it has ended).
    starter.single_launch()
    secret = bytes.fromhex(os.environ.pop(SECRET_VAR))
    host, port = os.environ.pop(ADDRESS_VAR).rsplit(":", 1)
    name = os.environ.get("SLURMD_NODENAME", "")
    conn = Client((host, int(port)), authkey=secret)
    conn.send_bytes(name.encode())
    args = serialize.loads(conn.recv_bytes())
    blob = conn.recv_bytes()
    # SIGTERM (srun forwarding a cancel or the caller's stop) as an interrupt: ranch stops the
    # node's ranks and returns, rather than this process dying with them still starting.
    signal.signal(signal.SIGTERM, lambda *_: signal.raise_signal(signal.SIGINT))
    # The caller sends nothing more: the channel's end means it is gone (killed with its kernel),
    # and so must this node's ranks be.
    threading.Thread(target=_watch, args=(conn,), name="mpify-caller-watch", daemon=True).start()
    first = args["node_rank"] * args["nprocs"]
    shipped, paths = _place_modules(args.get("modules") or {})
    try:
        try:
            fn, fn_args, kwargs, extra = serialize.loads(blob)
        except ModuleNotFoundError as exc:
            exc.add_note(f"mpify: node {args['node_rank']} ({name}) cannot import {exc.name!r}: modules travel "
                         "by name, so each must be importable on every node (the same environment path)")
            raise
        values = ranch(args["nprocs"], fn, *fn_args, ctx=extra.get("ctx"), caller_rank=None, gather=True,
                       timeout=args.get("timeout"), nnodes=args["nnodes"], node_rank=args["node_rank"],
                       master_addr=args["master_addr"], master_port=args["master_port"],
                       imports=extra.get("imports", ""), **kwargs)
        blob = serialize.dumps({first + i: v for i, v in enumerate(values)})
        message = Done(first, time.monotonic(), blob)
    except BaseException as exc:
        message = Failed.of(getattr(exc, "mpify_rank", first), exc, time.monotonic())
        if isinstance(exc.__cause__, RemoteTraceback):  # the rank's own traceback, not this process's
            message.tb_text = exc.__cause__.text
        for here, there in paths.items():  # the caller's name of the shipped files (its cell map)
            message.tb_text = message.tb_text.replace(here, there)
    finally:
        shutil.rmtree(shipped, ignore_errors=True)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        conn.send_bytes(serialize.dumps(message))
    except OSError:  # the caller is gone
        return 1
    return 0


def _place_modules(modules: dict[str, tuple[str, str]]) -> tuple[str, dict[str, str]]:
    """Write the modules the caller shipped as text (`mpify run`'s payload: slurm.ship_modules)
    into a private folder first on sys.path, as the caller imported them; the folder's path, and
    each file's path here -> its path in the caller."""
    folder = tempfile.mkdtemp(prefix="mpify-node-")
    paths = {}
    for module_name, (text, caller_path) in modules.items():
        here = os.path.join(folder, module_name + ".py")
        with open(here, "w", encoding="utf-8") as f:
            f.write(text)
        paths[here] = caller_path
    sys.path.insert(0, folder)
    return folder, paths


def _watch(conn) -> None:
    """Interrupt this process once the caller's end of the channel closes."""
    try:
        conn.poll(None)
        if conn.recv_bytes():
            return
    except (EOFError, OSError):
        pass
    os.kill(os.getpid(), signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
