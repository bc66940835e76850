"""World from plain Python: push, exec, pull, run, status, failures, and nothing left behind."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

import mpify
from helpers import described, python_script, strays, wait_gone
from mpify import RankDiedError, World, WorldClosedError

SCRIPT = r'''
import os, sys
import numpy as np
import torch
from mpify import World

class Box:                      # a class of the script's own __main__
    def __init__(self, v):
        self.v = v

def scaled(k):
    import torch.distributed as dist
    return dist.get_rank() * k

with World(3, ddp=True) as w:
    big = torch.arange(2_000_000, dtype=torch.float64)   # 16 MB: through shared memory
    w.push(big=big, arr=np.ones(5), box=Box(7), Box=Box)
    w.exec("import torch.distributed as dist\ns = float(big.sum()) + float(arr.sum()) + box.v", ranks=[1, 2])
    print("PULLED", [w.pull("s", r) for r in (1, 2)])
    w.exec("b = Box(dist.get_rank() * 10)", ranks=[1, 2])
    print("BOX", type(w.pull("b", 2)).__name__, w.pull("b", 2).v)
    print("RUN", w.run(scaled, 5), w.run(scaled, 5, gather=True))
    w.exec("import torch, torch.distributed as dist\nt = torch.ones(1) * (dist.get_rank() + 1)\ndist.all_reduce(t)")
    print("SUM", t.item(), w.pull("t", 1).item())
    print("STATUS", [(r["rank"], r["alive"]) for r in w.status()])
    print("ENV", os.environ["RANK"], os.environ["WORLD_SIZE"])
print("AFTER", "RANK" in os.environ, w)
'''


def test_world_from_a_plain_script(tmp_path):
    out = subprocess.run(python_script(tmp_path, SCRIPT), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    expected = float(sum(range(2_000_000))) + 5 + 7
    assert f"PULLED [{expected}, {expected}]" in lines
    assert "BOX Box 20" in lines
    assert "RUN 0 [0, 5, 10]" in lines
    assert "SUM 6.0 6.0" in lines
    assert "STATUS [(0, True), (1, True), (2, True)]" in lines
    assert "ENV 0 3" in lines
    assert "AFTER False <mpify.World of 3 (closed)>" in lines


@pytest.fixture
def world(no_strays):
    with World(3) as w:
        yield w
    assert "RANK" not in os.environ


def test_exec_keeps_each_ranks_namespace(world, capfd):
    world.exec("import os\ncount = int(os.environ['RANK']) * 100", ranks=[1, 2])
    world.exec("count += 1", ranks=[1, 2])
    assert [world.pull("count", r) for r in (1, 2)] == [101, 201]
    assert world.exec("7 * 6", ranks=[0]) == 42
    world.exec("count", ranks=[1])
    time.sleep(0.2)
    assert "[rank 1] 101" in capfd.readouterr().out


def test_a_rank_that_raises_leaves_the_world_usable(world):
    with pytest.raises(ZeroDivisionError) as info:
        world.exec("import os\nif os.environ['RANK'] == '1':\n    1 / 0")
    assert info.value.mpify_rank == 1
    remote = str(info.value.__cause__)  # the rank's own traceback, from the cell on
    assert "<ranch cell" in remote and "1 / 0" in remote and "world/rank.py" not in remote
    assert world.run(lambda: int(os.environ["RANK"]), gather=True) == [0, 1, 2]


def test_the_user_makes_the_group_in_a_cell(world):
    """No ctx: the rank environment holds, so init_process_group() needs no arguments."""
    world.exec("import torch, torch.distributed as dist\ndist.init_process_group('gloo')\n"
               "t = torch.ones(1) * (dist.get_rank() + 1)\ndist.all_reduce(t)")
    import __main__
    assert __main__.t.item() == 6 and world.pull("t", 2).item() == 6
    world.exec("dist.destroy_process_group()")


REINIT = ("import os, time, torch, torch.distributed as dist\n"
          "if os.environ['RANK'] == '0':\n"
          "    time.sleep(1.5)  # the other ranks reach the store first\n"
          "dist.init_process_group('gloo')\n"
          "t = torch.ones(1) * (dist.get_rank() + 1)\n"
          "dist.all_reduce(t)\n"
          "dist.destroy_process_group()")


@pytest.mark.parametrize("hosted", [True, False], ids=["store-hosted", "rank0-hosts"])
def test_a_group_made_again_in_a_later_cell_meets_anew(no_strays, hosted):
    """The way a framework trains in each cell (ignite's idist.Parallel, a script's main): a group
    made and destroyed, then made again. The store still held the first group's keys (a new
    default group has the same name), so a rank that came before rank 0 read rank 0's old gloo
    address and failed ("Gloo connectFullMesh failed"); each new group now meets on a fresh store."""
    if hosted:  # the world hosts the store when the caller has torch (a kernel that imported it)
        import torch  # noqa: F401
    with World(3) as world:
        if not hosted:
            assert world.meeting.store is None or "torch" in sys.modules
        for _ in range(3):
            world.exec(REINIT)
            assert [world.pull("t", r).item() for r in (1, 2)] == [6.0, 6.0]


def test_a_rank_killed_between_cells_closes_the_world(no_strays, capfd):
    w = World(3)
    pid = w.status()[2]["pid"]
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while not w.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert w.closed
    with pytest.raises(WorldClosedError) as info:
        w.exec("1")
    assert isinstance(info.value.__cause__, RankDiedError) and info.value.__cause__.rank == 2
    assert "rank 2 died" in capfd.readouterr().err
    assert not wait_gone([pid], 2)
    assert not strays(), described(strays())


def test_start_failure_is_typed_and_leaves_nothing(no_strays):
    class Broken:
        def __enter__(self):
            if os.environ["RANK"] == "2":
                raise RuntimeError("cannot enter on rank 2")
        def __exit__(self, *exc):
            pass

    with pytest.raises(RuntimeError, match="cannot enter on rank 2"):
        World(3, ctx=Broken)
    assert "RANK" not in os.environ


def test_one_rank_world_and_bad_arguments(no_strays):
    with World(1) as w:
        assert w.exec("1 + 1") == 2 and w.run(lambda: 5, gather=True) == [5]
        with pytest.raises(ValueError, match="no rank"):
            w.exec("1", ranks=[3])
    with pytest.raises(WorldClosedError):
        w.run(print)
    with pytest.raises(ValueError):
        World(2, backend="gloo")
    assert mpify.World is World and sys.modules["mpify"].WorldClosedError is WorldClosedError


def test_a_rank_that_stays_stuck_is_killed_and_the_world_closes(no_strays):
    """A rank that neither returns to Python nor sits in a collective (here: SIGINT blocked, asleep)
    is killed once the ladder's bounds are spent; the cause is still the rank that raised."""
    w = World(3)
    pids = [row["pid"] for row in w.status()][1:]
    start = time.monotonic()
    with pytest.raises(ValueError) as info:
        w.exec("import os, signal, time\nr = int(os.environ['RANK'])\nif r == 1:\n"
               "    time.sleep(0.5)\n    raise ValueError('the cause')\nif r == 2:\n"
               "    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGINT])\n    time.sleep(60)")
    took = time.monotonic() - start
    assert str(info.value) == "the cause" and info.value.mpify_rank == 1
    assert any("2 stayed stuck and were killed" in n for n in info.value.__notes__)
    assert took < 10, took
    assert w.closed and not wait_gone(pids, 2)


def test_a_world_left_open_closes_at_interpreter_exit(tmp_path):
    script = ("from mpify import World\nw = World(3)\nprint('PIDS', *[r['pid'] for r in w.status()][1:])\n"
              "w.exec('x = 1')\n")  # no close(): atexit does it
    start = time.monotonic()
    out = subprocess.run(python_script(tmp_path, script), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    pids = [int(p) for p in out.stdout.split("PIDS", 1)[1].split()]
    assert len(pids) == 2 and not wait_gone(pids, 5.0)
    assert time.monotonic() - start < 30


def test_a_rank_never_blocks_on_a_full_pipe(world, capfd):
    """300 KB on stderr (tqdm, warnings, logging) in one cell, and output written between cells
    by a thread of the rank: both are read as they come."""
    start = time.monotonic()
    world.exec("import sys\nfor i in range(3000):\n    print('w' * 99, i, file=sys.stderr)", ranks=[1])
    world.exec("import threading, time, sys\n"
               "threading.Thread(target=lambda: [print('bg' * 50, i, file=sys.stderr) for i in range(3000)]).start()",
               ranks=[2])
    time.sleep(1.0)  # the rank's thread writes while no cell runs
    assert world.exec("7", ranks=[0, 2]) == 7
    assert time.monotonic() - start < 20
    err = capfd.readouterr().err
    assert err.count("[rank 1] " + "w" * 99) == 3000 and "[rank 1] " + "w" * 99 + " 2999" in err
    assert err.count("[rank 2] " + "bg" * 50) == 3000
