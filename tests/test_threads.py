"""One thread per rank by default, as torchrun does (engine/env.py): OMP_NUM_THREADS=1 and torch's
pool of one thread in every rank when several share the machine and the user has not chosen;
the caller's own setting back afterwards."""
import os
import subprocess
import sys

import pytest

from helpers import die_with_parent
from mpify import World, ranch
from mpify.engine.start import pool

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def seen():
    import torch
    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()


@pytest.fixture
def three_threads(monkeypatch):
    """The caller's own choice, distinct from the default and from 1; put back afterwards."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    yield
    torch.set_num_threads(before)


def test_each_rank_gets_one_thread_and_the_caller_gets_its_own_back(three_threads):
    assert ranch(2, seen, gather=True) == [("1", 1), ("1", 1)]
    assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == 3
    # a live world: rank 0 holds one thread for the world's life
    server = pool.wait_complete()
    with World(2) as world:
        assert world.run(seen, gather=True) == [("1", 1), ("1", 1)]
        assert seen() == ("1", 1)
        # the world's own OMP_NUM_THREADS=1 in the caller is no user change: a launch beside the
        # world, and one after it, fork from the same forkserver (an OMP_* change needs a new one)
        assert ranch(2, seen, gather=True) == [("1", 1), ("1", 1)]
        assert set(ranch(2, os.getppid, caller_rank=None, gather=True)) == {server}
    assert "OMP_NUM_THREADS" not in os.environ and torch.get_num_threads() == 3
    assert ranch(2, seen, gather=True) == [("1", 1), ("1", 1)]
    assert set(ranch(2, os.getppid, caller_rank=None, gather=True)) == {server}


def test_one_rank_is_left_alone(three_threads):
    assert ranch(1, seen) == (None, 3)
    assert ranch(1, seen, caller_rank=None)[0] is None  # a child alone: no variable set either


# Each in a process of its own whose caller has not imported torch, so that its forkserver stays
# light and nothing here restarts the test session's forkserver (an OMP_* change restarts it).
FIRST_IMPORT = """
import os, sys
from mpify import ranch
def f():
    import torch
    return os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
print(ranch(2, f, gather=True), "torch" in sys.modules)
import torch
print(torch.get_num_threads(), len(os.sched_getaffinity(0)), os.environ.get("OMP_NUM_THREADS"))
"""
USERS_OWN = FIRST_IMPORT.replace("import os, sys", "import os, sys; os.environ['OMP_NUM_THREADS'] = '3'")


def test_the_users_value_is_kept_and_torch_imported_in_the_launch_gets_its_default_back(tmp_path):
    """A caller that had not imported torch (TorchDDPCtx imports it in rank 0) must not keep the
    one thread its launch's OMP_NUM_THREADS=1 gave torch's pool at import; a user's own value
    reaches every rank and stays."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env, cwd=tmp_path, preexec_fn=die_with_parent)
             for script in (FIRST_IMPORT, USERS_OWN)]
    (first, err1), (users, err2) = [p.communicate(timeout=150) for p in procs]
    assert procs[0].returncode == 0, err1[-3000:]
    assert procs[1].returncode == 0, err2[-3000:]
    ranks, caller = first.splitlines()
    assert ranks == "[('1', 1), ('1', 1)] True"
    threads, cpus, var = caller.split()
    assert threads == cpus and var == "None"  # torch's default here: one thread per CPU
    # the user's OMP_NUM_THREADS=3: the ranks' pools are what torch makes of it in the caller
    # (a fresh import; torch caps it at the CPUs), not one
    ranks, caller = users.splitlines()
    threads, cpus, var = caller.split()
    assert ranks == f"[('3', {threads}), ('3', {threads})] True" and var == "3"
