"""ranch's everyday behaviour: results, rank environment, what travels to the ranks, ctx, output,
argument checks. Real processes throughout."""
import io
import os
import sys
import time

import pytest

from mpify import ShipError, ResultError, import_star, ranch

RANK_VARS = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK",
             "MASTER_ADDR", "MASTER_PORT"]


def rank_and_env():
    return {k: os.environ.get(k) for k in RANK_VARS}


def test_returns_rank0_value_and_gathers(no_strays):
    assert ranch(3, lambda x: int(os.environ["RANK"]) * x, 10) == 0
    assert ranch(3, lambda x: int(os.environ["RANK"]) * x, 10, gather=True) == [0, 10, 20]
    # The caller need not take part: every rank a child.
    out = ranch(3, lambda: (int(os.environ["RANK"]), os.getpid()), caller_rank=None, gather=True)
    assert [r for r, _ in out] == [0, 1, 2] and os.getpid() not in [p for _, p in out]
    # The caller may take another rank; the result is still rank 0's.
    assert ranch(3, lambda: (int(os.environ["RANK"]), os.getpid()), caller_rank=2)[0] == 0
    assert ranch(3, lambda: os.getpid(), caller_rank=2, gather=True)[2] == os.getpid()


def test_single_rank_runs_in_caller(no_strays):
    assert ranch(1, lambda: os.getpid()) == os.getpid()


def test_rank_environment_is_torchrun_like(no_strays):
    envs = ranch(4, rank_and_env, gather=True)
    port = envs[0]["MASTER_PORT"]
    assert port.isdigit() and int(port) > 0
    for r, env in enumerate(envs):
        assert env == {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4",
                       "GROUP_RANK": "0", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}


def test_user_master_port_and_env_restored(no_strays, monkeypatch):
    monkeypatch.setenv("MASTER_PORT", "29999")
    monkeypatch.setenv("RANK", "already-set")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    before = dict(os.environ)
    envs = ranch(2, rank_and_env, gather=True)
    assert [e["MASTER_PORT"] for e in envs] == ["29999", "29999"]
    assert dict(os.environ) == before


def test_children_see_callers_env_path_and_cwd(no_strays, tmp_path, monkeypatch):
    monkeypatch.setenv("MPIFY_TEST_VALUE", "seen")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "extra"))

    def look():
        return os.environ.get("MPIFY_TEST_VALUE"), os.getcwd(), sys.path[0]

    for got in ranch(3, look, gather=True):
        assert got == ("seen", str(tmp_path), str(tmp_path / "extra"))
    # Changes made between launches reach the ranks of the next launch.
    monkeypatch.setenv("MPIFY_TEST_VALUE", "changed")
    assert ranch(2, look, gather=True, caller_rank=None)[1][0] == "changed"


# Defined at module level of a test module, like a cell's code in `__main__`: shipped by value.
class Accumulator:
    def __init__(self, start):
        self.total = start

    def add(self, v):
        self.total += v
        return self


def test_lambdas_closures_classes_and_objects_travel(no_strays):
    base = 100
    scale = lambda v: v * base  # noqa: E731  (a lambda closing over a local)

    def work(acc, f):
        rank = int(os.environ["RANK"])
        return acc.add(f(rank)).total, type(acc).__name__

    assert ranch(3, work, Accumulator(1), scale, gather=True) == [(1, "Accumulator"), (101, "Accumulator"),
                                                                     (201, "Accumulator")]

    class Local:  # a class defined inside a function
        def __init__(self):
            self.rank = int(os.environ["RANK"])

    assert [o.rank for o in ranch(2, Local, gather=True)] == [0, 1]


def test_keyword_arguments_reach_fn(no_strays):
    def f(a, b=1, *, c):
        return a + b + c
    assert ranch(2, f, 1, b=2, c=3, gather=True) == [6, 6]


async def waits_then_answers(x):
    import asyncio
    await asyncio.sleep(0.05)
    if x < 0:
        raise ValueError(f"async rank {os.environ['RANK']} refuses {x}")
    return x * int(os.environ["RANK"])


def test_async_functions_run_to_the_end_in_every_rank(no_strays):
    import asyncio
    assert ranch(3, waits_then_answers, 2, gather=True) == [0, 2, 4]
    # both ranks raise at once: whichever error reaches the caller first is the one raised
    with pytest.raises(ValueError, match="async rank [01] refuses -1"):
        ranch(2, waits_then_answers, -1)

    async def from_a_running_loop():  # as in a Jupyter kernel, whose thread runs a loop
        return ranch(2, waits_then_answers, 5, gather=True)
    assert asyncio.run(from_a_running_loop()) == [0, 5]


def test_import_star_in_ranks(no_strays):
    def uses_star():
        import_star(["json", "os.path"])
        return dumps({"a": basename("/x/y")})  # noqa: F821  (names supplied by import_star)

    assert ranch(2, uses_star, gather=True) == ['{"a": "y"}'] * 2


def test_import_star_honours_all(tmp_path, monkeypatch):
    (tmp_path / "starmod.py").write_text("__all__ = ['shown']\nshown = 1\nhidden = 2\n_private = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ns = {}
    import_star("starmod", into=ns)
    assert ns == {"shown": 1}


def test_import_star_missing_module_names_it(no_strays):
    def bad():
        import_star(["no_such_module_xyz"])

    with pytest.raises(ImportError, match="no_such_module_xyz"):
        ranch(2, bad)


class Recorder:
    """A context manager that leaves a trace in the rank's environment."""

    def __enter__(self):
        os.environ["MPIFY_CTX"] = "in"
        return self

    def __exit__(self, *exc):
        os.environ.pop("MPIFY_CTX", None)


class FailingEnter:
    def __enter__(self):
        raise RuntimeError("enter failed on purpose")

    def __exit__(self, *exc):
        pass


def test_ctx_instance_and_factory(no_strays):
    look = lambda: os.environ.get("MPIFY_CTX")  # noqa: E731
    assert ranch(2, look, ctx=Recorder(), gather=True) == ["in", "in"]
    assert ranch(2, look, ctx=Recorder, gather=True) == ["in", "in"]
    assert "MPIFY_CTX" not in os.environ
    with pytest.raises(RuntimeError, match="enter failed on purpose"):
        ranch(2, look, ctx=FailingEnter())
    with pytest.raises(TypeError, match="ctx"):
        ranch(2, look, ctx=42)


def test_original_mpify_keywords(no_strays):
    # need: names of caller globals to ship; imports: import lines run in each rank.
    def f():
        return NEEDED_VALUE + len(sqrt.__name__)  # noqa: F821

    globals()["NEEDED_VALUE"] = 40
    try:
        assert ranch(2, f, need="NEEDED_VALUE", imports="from math import sqrt", gather=True,
                     caller_rank=0) == [44, 44]
    finally:
        del globals()["NEEDED_VALUE"]
    with pytest.raises(NameError, match="NOT_DEFINED_ANYWHERE"):
        ranch(2, f, need="NOT_DEFINED_ANYWHERE")


@pytest.mark.parametrize("call, exc, text", [
    (lambda: ranch(0, print), ValueError, "nprocs"),
    (lambda: ranch("2", print), TypeError, "nprocs"),
    (lambda: ranch(True, print), TypeError, "nprocs"),
    (lambda: ranch(2, "print"), TypeError, "fn must be callable"),
    (lambda: ranch(2, print, caller_rank=2), ValueError, "caller_rank"),
    (lambda: ranch(2, print, timeout=0), ValueError, "timeout"),
    (lambda: ranch(2, print, nnodes=2, node_rank=2), ValueError, "node_rank"),
    (lambda: ranch(2, print, show_ranks=True), TypeError, "show_ranks"),
    (lambda: ranch(2, print, show_ranks="x"), TypeError, "show_ranks"),
    (lambda: ranch(2, print, show_ranks=[1.5]), TypeError, "show_ranks"),
])
def test_bad_arguments_fail_before_anything_starts(no_strays, call, exc, text):
    with pytest.raises(exc, match=text):
        call()


def test_unpicklable_argument_is_named_before_start(no_strays):
    lock = (i for i in range(3))  # a generator: neither pickle nor dill can ship one
    with pytest.raises(ShipError, match="positional argument 0"):
        ranch(2, lambda l: 1, lock)
    with pytest.raises(ShipError, match="keyword argument `guard`"):
        ranch(2, lambda guard: 1, guard=lock)

    def uses_lock():
        return next(lock)
    with pytest.raises(ShipError, match="`lock`"):
        ranch(2, uses_lock)


def test_unpicklable_result_names_rank_and_type(no_strays):
    def gives_lock():
        return (i for i in range(3))
    with pytest.raises(ResultError, match=r"rank 1 returned a builtins.generator"):
        ranch(2, gives_lock, gather=True)


def test_output_is_prefixed_whole_lines_and_live(no_strays, monkeypatch):
    sink = io.StringIO()
    monkeypatch.setattr(sys, "stdout", sink)

    def talk():
        rank = int(os.environ["RANK"])
        if rank == 0:
            # Rank 0 is the caller: it sees rank 1's line arrive while rank 1 is still running.
            deadline = time.monotonic() + 20
            while "[rank 1] early" not in sys.stdout.getvalue():
                if time.monotonic() > deadline:
                    return "never arrived"
                time.sleep(0.05)
            return "arrived live"
        print("early", flush=False)
        print("partial", end="")
        print(" line")
        print("on stderr", file=sys.stderr)
        time.sleep(1.0)
        return None

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert ranch(2, talk) == "arrived live"
    lines = sink.getvalue().splitlines()
    assert "[rank 1] early" in lines and "[rank 1] partial line" in lines
    assert "[rank 1] on stderr" in sys.stderr.getvalue()


def test_show_ranks_filters_output(no_strays, monkeypatch):
    sink = io.StringIO()
    monkeypatch.setattr(sys, "stdout", sink)
    ranch(3, lambda: print("hi from", os.environ["RANK"]), caller_rank=None, show_ranks=[2])
    assert sink.getvalue().splitlines() == ["[rank 2] hi from 2"]


def test_rank_lines_never_split_the_callers_own_lines(no_strays, monkeypatch):
    sink = io.StringIO()
    monkeypatch.setattr(sys, "stdout", sink)

    def chatter():
        rank = int(os.environ["RANK"])
        for i in range(100):
            if rank == 0:  # the caller: like print(), text and newline in separate writes
                sys.stdout.write(f"caller {i}")
                time.sleep(0.002)
                sys.stdout.write("\n")
            else:
                print(f"child {i}", flush=True)
        return rank

    assert ranch(3, chatter) == 0
    lines = sink.getvalue().splitlines()
    import re
    bad = [line for line in lines if not re.fullmatch(r"caller \d+|\[rank [12]\] child \d+", line)]
    assert not bad, bad[:5]
    assert len(lines) == 300
    assert sys.stdout is sink  # the caller's stream is put back


def slow_rank():
    import time
    time.sleep(1.0)
    return int(os.environ["RANK"])


def test_a_launch_from_a_second_thread_is_refused_and_nested_launches_work(no_strays):
    import threading
    from mpify import LaunchBusyError
    started, out = threading.Event(), {}

    def background():
        started.set()
        out["bg"] = ranch(2, slow_rank, gather=True)

    t = threading.Thread(target=background, name="trainer")
    t.start()
    started.wait()
    import time
    time.sleep(0.3)
    with pytest.raises(LaunchBusyError, match="from thread 'trainer'"):
        ranch(2, slow_rank)
    t.join()
    assert out["bg"] == [0, 1]
    assert ranch(2, lambda: ranch(2, slow_rank, gather=True), gather=True) == [[0, 1], [0, 1]]  # nested


DEEP_TMPDIR_SCRIPT = """
import os
from mpify import ranch
from mpify.engine.start import forkserver

def where():
    return os.environ["RANK"]

print("RESULTS", ranch(3, where, gather=True), ranch(2, where, gather=True), flush=True)
print("OUTSIDE", [owned[-1] for owned in forkserver._outside], flush=True)
"""


def test_a_deep_tmpdir_still_launches_and_leaves_nothing(tmp_path):
    """A TMPDIR too deep for a socket's path (a CI's per-test folder: bind failed with "AF_UNIX
    path too long" before any rank started): the forkservers' sockets go to a short folder of
    their own, removed at exit, as is everything in TMPDIR."""
    import subprocess

    from helpers import die_with_parent, python_script

    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if k not in RANK_VARS}
    env["TMPDIR"] = str(deep)
    done = subprocess.run(python_script(tmp_path, DEEP_TMPDIR_SCRIPT), env=env, capture_output=True,
                          text=True, timeout=120, preexec_fn=die_with_parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "RESULTS ['0', '1', '2'] ['0', '1']" in done.stdout, done.stdout + done.stderr
    outside = eval(done.stdout.split("OUTSIDE", 1)[1].strip())
    assert outside and all(len(f) < 40 for f in outside), outside  # the short folders were used
    assert not [f for f in outside if os.path.exists(f)], "left behind"
    assert not [n for n in os.listdir(deep) if n.startswith(("pymp-", "mpify-"))], os.listdir(deep)
