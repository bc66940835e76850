"""A live world's rank: a child that stays, keeps a namespace, and answers the caller's commands.

It starts as a launch's rank does (child.become_rank: its own process group, the watchdog that
ends it when the caller dies, output into the caller's pipes), enters the world's ctx once
(TorchDDPCtx: one process group for the world's life), then answers one command at a time from
its command pipe until `Close` or the pipe's end (the caller is gone).

Its namespace is a fresh `__main__` module: code and functions a cell defines there are
`__main__`'s, as in the notebook, so dill sends them (and objects of classes defined in cells)
back to the caller by value.

SIGINT raises KeyboardInterrupt only while user code runs (a cell, a function, a pushed value's
unpickling); between commands it is ignored, so an interrupt that arrives just as a rank finishes
never breaks the protocol or leaks into the next cell.
"""
from __future__ import annotations

import ast
import builtins
import gc
import linecache
import os
import signal
import sys
import threading
import time
import types
from contextlib import ExitStack
from typing import Any

from mpify.engine.rank import displays, groups
from mpify.engine.args import serialize
from mpify.engine.rank.child import RankSpec, become_rank, call_fn, rank_scope, stamp_failure
from mpify.engine.world.unstick import break_pairs
from mpify.engine.messages import Call, Close, Done, Exec, Failed, MeetAt, Pull, Push, Rebuild, Status

# Set while user code runs in this rank: only then does SIGINT raise KeyboardInterrupt.
_busy = threading.Event()


def _on_sigint(signum, frame) -> None:
    if _busy.is_set():
        raise KeyboardInterrupt()


def run_source(source: str, namespace: dict, filename: str) -> Any:
    """Run a cell's source as a notebook does: every statement, then the value of a last
    expression (returned). The source is put in linecache so tracebacks show its lines."""
    linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = ast.Expression(tree.body.pop().value)
    exec(compile(tree, filename, "exec"), namespace)
    if last is None:
        return None
    return eval(compile(last, filename, "eval"), namespace)


def destroy_groups() -> None:
    """Destroy every process group this process holds (the default one and new_group's): the
    peers blocked on them in a collective see their connections close and fail."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def memory_status() -> dict:
    """pid, resident memory, and the CUDA device and memory where this process uses CUDA."""
    import psutil

    info: dict = {"pid": os.getpid(), "rss_mb": round(psutil.Process().memory_info().rss / 2**20, 1),
                  "device": "cpu"}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        device = torch.cuda.current_device()
        info["device"] = f"cuda:{device}"
        info["cuda_mb"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
    return info


_ENGINE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # mpify/engine/, its rooms included


def _from_user_code(exc: BaseException) -> BaseException:
    """The traceback from the first frame that is not the engine's: a cell's error shows the
    cell's lines, as the notebook shows rank 0's."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None and \
            os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_ENGINE_DIR):
        tb = tb.tb_next
    return exc.with_traceback(tb)


class _Rank:
    def __init__(self, spec: RankSpec, ctx: Any, reply_w):
        self.spec = spec
        self.ctx = ctx
        self.reply_w = reply_w
        self.scope = ExitStack()
        self.namespace = self._fresh_main()

    @staticmethod
    def _fresh_main() -> dict:
        main = types.ModuleType("__main__")
        main.__dict__["__builtins__"] = builtins
        # A notebook cell finds `display` among its builtins (IPython puts it there); a rank's
        # cells find it here, in their namespace only: a launch's rank stays as torchrun's.
        main.__dict__["display"] = displays.display
        sys.modules["__main__"] = main
        return main.__dict__

    def reply(self, message: Done | Failed) -> None:
        sys.stdout.flush()  # the cell's output reaches the caller before its reply
        sys.stderr.flush()
        self.reply_w.send_bytes(serialize.dumps(message))

    def user_code(self, run, *args) -> Done | Failed:
        """Run user code with SIGINT live; its value or its exception as the reply."""
        _busy.set()
        try:
            value = run(*args)
            _busy.clear()
            return Done(self.spec.rank, time.monotonic(), value)
        except BaseException as exc:  # KeyboardInterrupt and SystemExit are a cell's outcome too
            _busy.clear()
            return Failed.of(self.spec.rank, _from_user_code(exc), stamp_failure(exc))
        finally:
            groups.release_destroyed()

    def enter(self) -> None:
        self.scope.enter_context(rank_scope(self.ctx))  # as a launch's rank, for the world's life

    def leave(self) -> None:
        scope, self.scope = self.scope, ExitStack()
        scope.close()

    # ---- the commands ------------------------------------------------------------------------
    def call(self, msg: Call) -> Any:
        fn, args, kwargs, _ = serialize.loads(msg.blob)
        value = call_fn(fn, args, kwargs)
        return serialize.dumps_result(self.spec.rank, value) if msg.send_result else None

    def exec(self, msg: Exec) -> None:
        value = run_source(msg.source, self.namespace, msg.filename)
        if msg.echo and value is not None:
            displays.show_value(value)
        self.namespace["_"] = value if value is not None else self.namespace.get("_")

    def push(self, msg: Push) -> None:
        _, _, _, objects = serialize.loads(msg.blob)  # packed as a launch: big buffers by shared memory
        self.namespace.update(objects)

    def pull(self, msg: Pull) -> bytes:
        if msg.name not in self.namespace:
            raise NameError(f"name {msg.name!r} is not defined in rank {self.spec.rank}")
        return serialize.dumps_result(self.spec.rank, self.namespace[msg.name])

    def rebuild(self, msg: Rebuild) -> None:
        self.leave()
        destroy_groups()  # one the user made in a cell, if ctx did not
        gc.collect()
        os.environ.update(msg.env)
        self.enter()

    def serve(self, cmd_r) -> None:
        handlers = {Call: self.call, Exec: self.exec, Push: self.push, Pull: self.pull,
                    Status: lambda msg: serialize.dumps(memory_status()), Rebuild: self.rebuild}
        while True:
            try:
                msg = serialize.loads(cmd_r.recv_bytes())
            except (EOFError, OSError):  # the caller is gone: the watchdog ends this group too
                return
            if isinstance(msg, Close):
                return
            if isinstance(msg, MeetAt):  # no reply: the command that follows has one
                os.environ.update(msg.env)
                continue
            self.reply(self.user_code(handlers[type(msg)], msg))


def _breaker(break_r) -> None:
    """The caller asks here, when this rank's main thread is stuck in a collective, for its
    connections to the other ranks to be shut down (see unstick.py)."""
    while True:
        try:
            pids, store_port, hosts = serialize.loads(break_r.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            break_pairs(pids, store_port, hosts)
        except Exception as exc:  # nothing to free, or psutil cannot see: the caller escalates
            print(f"mpify: could not free this rank: {exc!r}", file=sys.stderr)


def world_main(spec: RankSpec, ctx_blob: bytes, cmd_r, reply_w, break_r, alive_r, out_w, err_w) -> None:
    """Entry point of a world's child rank (the target of its multiprocess.Process)."""
    become_rank(spec, alive_r, out_w, err_w)
    signal.signal(signal.SIGINT, _on_sigint)
    threading.Thread(target=_breaker, args=(break_r,), name="mpify-breaker", daemon=True).start()
    rank = _Rank(spec, None, reply_w)

    def start() -> None:
        rank.ctx = serialize.loads(ctx_blob)[3]["ctx"]
        rank.enter()

    started = rank.user_code(start)
    rank.reply(started)
    if isinstance(started, Failed):
        return
    try:
        rank.serve(cmd_r)
    finally:
        rank.leave()  # TorchDDPCtx destroys the world's group; launch_scope releases the rest
