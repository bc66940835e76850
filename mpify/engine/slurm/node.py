"""A node's resident process for Slurm launches and worlds (agents.py): one per other node,
started by `srun` there, kept between launches as a warm forkserver is.

It calls the caller back over the authenticated channel (the secret and address come in its
environment from srun, and leave it at once, so its ranks never hold them), then serves one job
at a time:
- `NodeLaunch`: that node's ranks of one launch, run with the engine's own multi-node `ranch`
  (every rank a child of this process, node_rank from the caller), answered by one `Done` (each
  rank's value, by global rank) or `Failed` (the first failure, with its rank);
- `NodeWorld`: that node's ranks of a live world (a `World` with no caller rank), then the
  world's commands, one reply each, until `Close`.
Its ranks' lines, prefixed on this node, travel on the channel as `Lines`, before the outcome
they precede. A reader thread takes every message off the channel: an `Interrupt` becomes this
process's SIGINT while a job runs (the job's own ladder stops its ranks, as Ctrl-C does on one
machine); the channel's end (the caller is gone) stops the job and this process; srun's SIGTERM
(a cancelled step or job) does the same.
"""
from __future__ import annotations

import importlib
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator

# Set while a job runs: only then does SIGINT (an Interrupt, srun's SIGTERM) raise here.
_busy = threading.Event()
_ending = threading.Event()  # the caller is gone or the step is cancelled: exit after the job


def _on_sigint(signum, frame) -> None:
    if _busy.is_set():
        raise KeyboardInterrupt()


def _on_sigterm(signum, frame) -> None:
    _ending.set()
    if _busy.is_set():
        raise KeyboardInterrupt()
    raise SystemExit(0)


class _ToCaller:
    """sys.stdout / sys.stderr of this process while a job runs: the ranks' lines (whole lines,
    prefixed by the job's forwarders) go to the caller as `Lines`."""

    def __init__(self, node: "Node", name: str):
        self.node = node
        self.name = name

    def write(self, text: str) -> int:
        if text:
            from mpify.engine.messages import Lines

            self.node.send(Lines(self.name, text.encode("utf-8", errors="replace")))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class Node:
    def __init__(self, conn, name: str):
        self.conn = conn
        self.name = name
        self.inbox: queue.Queue = queue.Queue()
        self._send_lock = threading.Lock()
        self.shipped: list[str] = []  # private folders of modules the caller sent as text

    # ---- the channel -----------------------------------------------------------------------
    def send(self, message: Any) -> None:
        from mpify.engine.args import serialize

        blob = serialize.dumps(message)
        with self._send_lock:
            self.conn.send_bytes(blob)

    def read_channel(self) -> None:
        """The reader thread: commands to the main thread's inbox, an Interrupt as SIGINT."""
        from mpify.engine.args import serialize
        from mpify.engine.messages import Interrupt

        try:
            while True:
                message = serialize.loads(self.conn.recv_bytes())
                if isinstance(message, Interrupt):
                    if _busy.is_set():
                        os.kill(os.getpid(), signal.SIGINT)
                    continue
                self.inbox.put(message)
        except (EOFError, OSError):  # the caller is gone: so must this node's ranks be
            _ending.set()
            self.inbox.put(None)
            if _busy.is_set():
                os.kill(os.getpid(), signal.SIGINT)

    @contextmanager
    def job(self) -> Iterator[None]:
        """While a job runs: SIGINT live, the ranks' lines to the caller."""
        before = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _ToCaller(self, "stdout"), _ToCaller(self, "stderr")
        _busy.set()
        try:
            if _ending.is_set():
                raise KeyboardInterrupt()
            yield
        finally:
            _busy.clear()
            sys.stdout, sys.stderr = before

    def outcome(self, first: int, run) -> Any:
        """Run a job; `Done` with its value (pickled), or `Failed` with the failed rank's own
        traceback, its shipped files named as the caller knows them."""
        from mpify.engine.args import serialize
        from mpify.engine.errors import RemoteTraceback
        from mpify.engine.messages import Done, Failed

        try:
            with self.job():
                value = run()
            return Done(first, time.monotonic(), serialize.dumps(value))
        except BaseException as exc:
            message = Failed.of(getattr(exc, "mpify_rank", first), exc, time.monotonic())
            if isinstance(exc.__cause__, RemoteTraceback):  # the rank's own traceback, not this process's
                message.tb_text = exc.__cause__.text
            for here, there in self.paths.items():  # the caller's name of the shipped files (its cell map)
                message.tb_text = message.tb_text.replace(here, there)
            return message

    def answer(self, message: Any) -> bool:
        try:
            self.send(message)
            return True
        except (OSError, ValueError):  # the caller is gone
            _ending.set()
            return False

    # ---- the jobs --------------------------------------------------------------------------
    def serve(self) -> None:
        from mpify.engine.errors import MpifyError
        from mpify.engine.messages import Failed, NodeLaunch, NodeWorld

        self.paths: dict[str, str] = {}
        while not _ending.is_set():
            message = self.inbox.get()
            if message is None:
                return
            if not isinstance(message, (NodeLaunch, NodeWorld)):
                # A world's command sent as its part here closed itself (the caller had not yet
                # heard): answered, so that nothing waits on it; the caller ends this process
                # rather than lend it again with the answer unread.
                self.answer(Failed.of(0, MpifyError(f"node {self.name}'s part of the world is closed"),
                                      time.monotonic()))
                continue
            self._place_modules(message.args.get("modules") or {})
            for name in message.args.get("heavy") or ():
                # As the caller has them: the forkserver of this node then preloads them too
                # (start/pool.py), and the ranks of the launches to come do not import them each.
                importlib.import_module(name)
            if isinstance(message, NodeLaunch):
                self.answer(self.outcome(_first(message.args), lambda: self.launch(message)))
            elif isinstance(message, NodeWorld):
                self.world(message)

    def launch(self, message) -> dict[int, Any]:
        from mpify.engine.launch.ranch import ranch

        args = message.args
        fn, fn_args, kwargs, extra = self._loads(message.payload, args)
        values = ranch(args["nprocs"], fn, *fn_args, ctx=extra.get("ctx"), caller_rank=None, gather=True,
                       timeout=args.get("timeout"), nnodes=args["nnodes"], node_rank=args["node_rank"],
                       master_addr=args["master_addr"], master_port=args["master_port"],
                       imports=extra.get("imports", ""), **kwargs)
        return {_first(args) + i: v for i, v in enumerate(values)}

    def world(self, message) -> None:
        """This node's ranks of a live world, and the world's commands until Close."""
        from mpify.engine.messages import Call, Close, Done, Exec, NodeLost, Pull, Push, Status
        from mpify.engine.world.world import World

        args = message.args
        first = _first(args)
        holder: dict[str, World] = {}

        def start() -> None:
            ctx = self._loads(message.ctx_blob, args)[3]["ctx"]
            holder["world"] = World(args["nprocs"], ctx=ctx, nnodes=args["nnodes"], node_rank=args["node_rank"],
                                    master_addr=args["master_addr"], master_port=args["master_port"],
                                    caller_rank=None)
            holder["world"].remote_hosts = args.get("hosts") or []

        if not self.answer(self.outcome(first, start)) or "world" not in holder:
            return
        world = holder["world"]
        try:
            while True:
                try:
                    command = self.inbox.get(timeout=0.5)
                except queue.Empty:
                    if world.closed:  # a rank died between cells: said now, not at the next cell
                        self.answer(NodeLost(f"node {args['node_rank']} ({self.name}): {world.lost_reason}"))
                        return
                    continue
                if command is None or isinstance(command, Close):
                    world.close()
                    if command is not None:
                        self.answer(Done(first, time.monotonic(), None))
                    return
                if isinstance(command, Call):
                    def run(command=command):
                        values = world.relay(Call(command.blob, True))
                        return values if command.send_result else None
                elif isinstance(command, Exec):
                    def run(command=command):
                        world.exec(command.source, ranks=command.ranks, filename=command.filename,
                                   echo=command.echo)
                elif isinstance(command, Push):
                    def run(command=command):
                        world.relay(command)
                elif isinstance(command, Pull):
                    def run(command=command):
                        return {command.rank: world.pull(command.name, command.rank)}
                elif isinstance(command, Status):
                    def run():
                        return {row["rank"]: dict(row, node=self.name) for row in world.status()}
                else:
                    continue
                if not self.answer(self.outcome(first, run)):
                    return
                if world.closed:
                    why = world.lost_reason or "its ranks were stuck and were stopped"
                    world.close()
                    self.answer(NodeLost(f"node {args['node_rank']} ({self.name}): {why}"))
                    return
        finally:
            world.close()

    # ---- what the caller ships -------------------------------------------------------------
    def _loads(self, blob: bytes, args: dict) -> Any:
        from mpify.engine.args import serialize

        try:
            return serialize.loads(blob)
        except ModuleNotFoundError as exc:
            exc.add_note(f"mpify: node {args['node_rank']} ({self.name}) cannot import {exc.name!r}: modules travel "
                         "by name, so each must be importable on every node (the same environment path)")
            raise

    def _place_modules(self, modules: dict[str, tuple[str, str]]) -> None:
        """Write the modules the caller shipped as text (`mpify run`'s payload: agents.ship_modules)
        into a private folder first on sys.path, as the caller imported them, replacing what an
        earlier job shipped; each file's path here -> its path in the caller."""
        for folder in self.shipped:
            shutil.rmtree(folder, ignore_errors=True)
            if folder in sys.path:
                sys.path.remove(folder)
        self.shipped, self.paths = [], {}
        if not modules:
            return
        folder = tempfile.mkdtemp(prefix="mpify-node-")
        for module_name, (text, caller_path) in modules.items():
            here = os.path.join(folder, module_name + ".py")
            with open(here, "w", encoding="utf-8") as f:
                f.write(text)
            self.paths[here] = caller_path
            sys.modules.pop(module_name, None)  # an earlier job's version of it
        sys.path.insert(0, folder)
        self.shipped.append(folder)

    def clean(self) -> None:
        for folder in self.shipped:
            shutil.rmtree(folder, ignore_errors=True)


def _first(args: dict) -> int:
    return args["node_rank"] * args["nprocs"]


def _blind(fd: int) -> None:
    try:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, fd)
        os.close(null)
    except OSError:
        pass


def main() -> int:
    from multiprocess.connection import Client

    from mpify.engine.slurm.agents import ADDRESS_VAR, SECRET_VAR

    # Anything written to fd 1 outside the ranks' forwarding (a C library's warning) joins the
    # step's stderr, whose tail the caller keeps for the error that names this node.
    os.dup2(2, 1)
    secret = bytes.fromhex(os.environ.pop(SECRET_VAR))
    host, port = os.environ.pop(ADDRESS_VAR).rsplit(":", 1)
    name = os.environ.get("SLURMD_NODENAME", "")
    conn = Client((host, int(port)), authkey=secret)
    conn.send_bytes(name.encode())
    # A process forked from this one (a zygote, the ranks) must not hold the channel: the caller
    # sees this process's death as the channel's end, which a forked copy would put off until it
    # exits. The copy's descriptor is pointed at /dev/null (not closed: its Connection object
    # closes that number again when it is collected).
    channel = conn.fileno()
    os.register_at_fork(after_in_child=lambda: _blind(channel))
    signal.signal(signal.SIGINT, _on_sigint)
    signal.signal(signal.SIGTERM, _on_sigterm)
    node = Node(conn, name)
    threading.Thread(target=node.read_channel, name="mpify-node-channel", daemon=True).start()
    try:
        node.serve()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        node.clean()
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
