"""What every rank runs: the same `run_rank` in a child process and in the caller.

A child first makes itself the leader of its own process group, so that teardown can reach its
DataLoader workers even after they are orphaned, and starts a watchdog thread on the caller's
liveness pipe: when the caller dies (kernel restart, `kill -9`) the pipe reports EOF and the rank
kills its whole group at once. Then it takes the caller's environment, working directory and
sys.path as of the launch, routes fd 1/2 into the caller's output pipes, unpickles the launch and
runs ctx + fn, and sends back a result or an error.
"""
from __future__ import annotations

import inspect
import os
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from mpify.engine.rank import displays, frameworks, groups, plain
from mpify.engine.args import serialize
from mpify.engine.env import follow_threads
from mpify.engine.messages import Done, Failed

# Set while the user's fn itself runs (not ctx enter/exit), so an abort request is delivered only
# there and never interrupts a context manager's teardown (destroy_process_group).
_in_fn = threading.Event()


@dataclass
class RankSpec:
    """What one child needs besides the pickled launch."""

    rank: int
    local_rank: int
    environ: dict
    cwd: str
    sys_path: list
    send_result: bool  # gather, or this rank is the local rank 0 whose value ranch returns
    displays: str = "files"  # where its displays and figures go: "cell" or "files" (displays.py)


def enter_ctx(ctx: Any):
    """ctx may be None, a context manager, or a factory (class or callable) that returns one."""
    if ctx is None:
        return nullcontext()
    if hasattr(ctx, "__enter__") and hasattr(ctx, "__exit__") and not isinstance(ctx, type):
        return ctx
    if callable(ctx):
        made = ctx()
        if not (hasattr(made, "__enter__") and hasattr(made, "__exit__")):
            raise TypeError(f"ctx factory {ctx!r} returned {type(made).__name__}, not a context manager")
        return made
    raise TypeError(f"ctx must be a context manager or a factory of one, not {type(ctx).__name__}")


@contextmanager
def rank_scope(ctx: Any) -> Iterator[Any]:
    """What surrounds fn in every rank, a launch's for one call and a world's for its life:
    frameworks' process-wide state set aside and reset (frameworks.py), then the groups created
    inside recorded (groups.py), then ctx. Leaving runs them the other way round, so the groups
    are released after ctx's exit (destroy_process_group), outside any frame that held a DDP
    model, and the frameworks are reset once the groups they describe are gone."""
    with frameworks.launch_state(), groups.launch_scope(), enter_ctx(ctx) as value:
        yield value


def run_rank(fn: Callable, args: tuple, kwargs: dict, ctx: Any, imports: str = "",
             need: dict | None = None, on_raise: Callable[[BaseException], None] | None = None) -> Any:
    """Run `fn(*args, **kwargs)` inside ctx. `need` and `imports` are the original mpify's way
    of naming globals and import lines that fn needs; they land in fn's globals. `on_raise` is
    called with fn's exception before ctx exits."""
    glb = getattr(fn, "__globals__", None)
    if glb is None:
        import __main__
        glb = __main__.__dict__
    if need:
        glb.update(need)
    if imports:
        exec(compile(imports, "<mpify imports>", "exec"), glb)
    with rank_scope(ctx):
        _in_fn.set()
        try:
            return call_fn(fn, args, kwargs)
        except BaseException as exc:
            # Dated here, before ctx's exit runs: TorchDDPCtx's destroy_process_group is what
            # makes the other ranks fail, and the rank that raised first must stay the earliest.
            stamp_failure(exc)
            if on_raise is not None:
                on_raise(exc)
            raise
        finally:
            _in_fn.clear()


def call_fn(fn: Callable, args: tuple, kwargs: dict) -> Any:
    """`fn(*args, **kwargs)`; an `async def` fn is run to its end (every rank runs it so)."""
    result = fn(*args, **kwargs)
    if inspect.iscoroutine(result):
        result = run_coroutine(result)
    return result


def run_coroutine(coro) -> Any:
    """Run an `async def` fn's coroutine on an event loop of its own.

    A child has no loop running, so asyncio.run. A Jupyter kernel's thread already runs one (it
    executes cells from its loop), where asyncio.run refuses: the coroutine then gets its own loop
    in a helper thread, and this thread waits for it."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(coro)
        except BaseException as exc:  # handed to the rank's thread below, traceback and all
            outcome["error"] = exc

    helper = threading.Thread(target=run, name="mpify-async-fn", daemon=True)
    helper.start()
    helper.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def stamp_failure(exc: BaseException) -> float:
    """When `exc` was raised in fn (CLOCK_MONOTONIC, comparable across the machine's processes)."""
    when = getattr(exc, "__mpify_when__", None)
    if when is None:
        when = time.monotonic()
        try:
            exc.__mpify_when__ = when
        except (AttributeError, TypeError):  # exceptions with __slots__
            pass
    return when


def error_message(rank: int, exc: BaseException) -> Failed:
    """The rank's failure as it travels to the caller, dated when fn raised."""
    return Failed.of(rank, exc, stamp_failure(exc))


def _watch_caller(alive_r) -> None:
    """Block until the caller's end of the liveness pipe closes, then end this rank's group."""
    try:
        alive_r.recv_bytes()
    except (EOFError, OSError):
        pass
    os.killpg(os.getpgid(0), signal.SIGKILL)


def _route_output(out_w, err_w) -> None:
    """Make fd 1/2 (and so grandchildren and C code) write into the caller's pipes, line-buffered."""
    os.dup2(out_w.fileno(), 1)
    os.dup2(err_w.fileno(), 2)
    out_w.close()
    err_w.close()
    sys.stdout = open(1, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)
    sys.stderr = open(2, "w", buffering=1, encoding="utf-8", errors="backslashreplace", closefd=False)


def become_rank(spec: RankSpec, alive_r, out_w, err_w) -> None:
    """A child's first steps, for a launch's rank and a world's alike: its own process group, the
    watchdog on the caller, fd 1/2 into the caller's pipes, the caller's environment, working
    directory and sys.path as of the start, torch's thread pool sized from that environment; then
    a plain process as torchrun starts one (plain.py) whose displays reach the caller (displays.py)."""
    if hasattr(os, "setpgid"):
        os.setpgid(0, 0)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    threading.Thread(target=_watch_caller, args=(alive_r,), name="mpify-watchdog", daemon=True).start()
    _route_output(out_w, err_w)
    os.environ.clear()
    os.environ.update(spec.environ)
    follow_threads()  # torch, imported in the forkserver, sized its pool before OMP_NUM_THREADS was set
    os.chdir(spec.cwd)
    sys.path[:] = spec.sys_path
    plain.become_plain()
    displays.install(spec.displays)


def rank_main(spec: RankSpec, launch: bytes, result_w, alive_r, out_w, err_w) -> None:
    """Entry point of a child rank (the target of its multiprocess.Process)."""
    become_rank(spec, alive_r, out_w, err_w)
    sent = []

    def report(message: Done | Failed) -> None:
        """Send this rank's one message (the first outcome wins), whole: the stop's SIGINT may
        come as fn ends, and its KeyboardInterrupt raised inside this send would leave the pipe
        empty while the rank still exits with code 0 (the caller then saw a rank die without a
        word). A SIGINT that comes meanwhile is held and raised once the message is out."""
        if sent:
            return
        held = []
        main = threading.current_thread() is threading.main_thread()
        if main:
            previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            data = serialize.dumps(message)
            sent.append(message)
            result_w.send_bytes(data)
        finally:
            if main:
                signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
                if held:
                    signal.raise_signal(signal.SIGINT)

    try:
        fn, args, kwargs, extra = serialize.loads(launch)
        # fn's exception is reported before ctx exits: leaving TorchDDPCtx destroys the process
        # group, the other ranks fail at once, and the stop that follows may not wait for us.
        value = run_rank(fn, args, kwargs, extra.get("ctx"), extra.get("imports", ""), extra.get("need"),
                         on_raise=lambda exc: report(error_message(spec.rank, exc)))
        blob = serialize.dumps_result(spec.rank, value) if spec.send_result else None
        report(Done(spec.rank, time.monotonic(), blob))
    except BaseException as exc:  # KeyboardInterrupt and SystemExit are a rank's outcome too
        try:
            report(error_message(spec.rank, exc))
        except KeyboardInterrupt:  # held while the message went out; nothing is left to stop
            if not sent:
                raise
    result_w.close()
