"""The fast paths: a warm forkserver that keeps torch imported, and large arguments through
shared memory (copy-on-write in each rank, nothing left in /dev/shm). Snapshots kept between
launches are tested in test_resident.py."""
import glob
import os
import sys

import pytest

from mpify import ranch
from mpify.engine.args import shm

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")


def shm_files():
    """This process's files in /dev/shm (named by the pid that made them): another test process
    on the machine may have its own there."""
    return glob.glob(os.path.join(shm._shm_dir(), f"{shm.PREFIX}{os.getpid()}-*"))


def where_am_i():
    # No import of torch here: if it is in sys.modules, the forkserver preloaded it.
    return "torch" in sys.modules, os.getppid()


def test_warm_launch_reuses_the_forkserver_with_torch_preloaded():
    first = ranch(3, where_am_i, caller_rank=None, gather=True)
    second = ranch(3, where_am_i, caller_rank=None, gather=True)
    assert all(has_torch for has_torch, _ in first + second)
    parents = {ppid for _, ppid in first + second}
    assert len(parents) == 1 and parents != {os.getpid()}  # one warm forkserver, started once


def test_changes_between_launches_reach_the_ranks(tmp_path, monkeypatch):
    look = lambda: (os.environ.get("MPIFY_BETWEEN"), os.getcwd(), sys.path[0])  # noqa: E731
    ranch(2, look)
    monkeypatch.setenv("MPIFY_BETWEEN", "2")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "lib"))
    assert ranch(2, look, gather=True)[1] == ("2", str(tmp_path), str(tmp_path / "lib"))


def checksum_and_scribble(arr, ten):
    """Each rank sees the caller's data; its own writes stay private (as with a pickled copy)."""
    rank = int(os.environ["RANK"])
    seen = (float(arr[:1000].sum()), float(ten.reshape(-1)[-1000:].sum()), arr.shape, tuple(ten.shape),
            str(ten.dtype))
    arr[0] = -rank - 1.0
    ten[0, 0] = -rank - 1.0
    import time
    time.sleep(0.3)  # let every rank write before anyone reads back
    return seen, float(arr[0]), float(ten[0, 0])


def test_large_array_and_tensor_arguments(no_strays):
    assert not shm_files()
    arr = np.arange(4 * 1024 * 1024, dtype=np.float32)  # 16 MB
    ten = torch.arange(2 * 1024 * 1024, dtype=torch.float64).reshape(1024, 2048)  # 16 MB
    expect = (float(arr[:1000].sum()), float(ten.reshape(-1)[-1000:].sum()), arr.shape, (1024, 2048),
              "torch.float64")
    out = ranch(4, checksum_and_scribble, arr, ten, caller_rank=None, gather=True)
    for rank, (seen, a0, t0) in enumerate(out):
        assert seen == expect
        assert (a0, t0) == (-rank - 1.0, -rank - 1.0)  # its own write, not another rank's
    assert arr[0] == 0 and ten[0, 0] == 0  # the caller's objects are untouched
    assert not shm_files()


def test_parameters_and_bfloat16_travel_by_shared_memory():
    p = torch.nn.Parameter(torch.ones(1024, 1024))
    b = torch.ones(1024, 1024, dtype=torch.bfloat16)

    def f(p, b):
        return type(p).__name__, p.requires_grad, float(p.sum()), str(b.dtype), float(b.float().sum())
    assert ranch(2, f, p, b, caller_rank=None, gather=True)[1] == ("Parameter", True, 1024.0 ** 2,
                                                                    "torch.bfloat16", 1024.0 ** 2)


def crash(*arrays):
    if os.environ["RANK"] == "1":
        os._exit(9)
    return [int(a.sum()) for a in arrays]


def test_shared_memory_is_released_when_a_rank_crashes(no_strays):
    from mpify import RankDiedError, shutdown
    shutdown()
    fds = set(os.listdir("/proc/self/fd"))
    kept = np.ones(8 * 1024 * 1024, dtype=np.uint8)  # its snapshot stays while it lives
    strided = np.ones(16 * 1024 * 1024, dtype=np.uint8)[::2]  # copied for this launch only
    with pytest.raises(RankDiedError):
        ranch(3, crash, kept, strided)
    assert not shm_files()
    del kept
    import gc
    gc.collect()
    shutdown()
    assert set(os.listdir("/proc/self/fd")) <= fds


def test_without_memfds_files_in_dev_shm_are_used_and_removed(monkeypatch, no_strays):
    # Not Linux, or a caller that is not dumpable: ranks cannot open /proc/<pid>/fd/<n>.
    from mpify import RankDiedError
    monkeypatch.setattr(shm, "_memfd_ok", False)
    arr = np.arange(4 * 1024 * 1024, dtype=np.float32)
    assert ranch(2, lambda a: float(a[-1]), arr, gather=True) == [float(arr[-1])] * 2
    assert shm.last_launch == {"shared": arr.nbytes, "copied": arr.nbytes}
    with pytest.raises(RankDiedError):
        ranch(3, crash, arr)
    assert not shm_files()


def test_files_of_a_killed_caller_are_swept(tmp_path):
    import subprocess
    # A caller that was SIGKILLed cannot clean up: its files carry its pid.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path = os.path.join(shm._shm_dir(), f"{shm.PREFIX}{dead.pid}-leftover")
    open(path, "wb").write(b"x")
    ranch(2, int, 1)  # any launch with children sweeps
    assert not os.path.exists(path)


def test_shutdown_stops_the_warm_forkserver_and_the_next_launch_starts_one():
    import psutil
    from mpify import shutdown
    first = ranch(2, where_am_i, caller_rank=None, gather=True)[0][1]
    assert psutil.pid_exists(first)
    shutdown()
    try:
        psutil.Process(first).wait(5)
    except psutil.NoSuchProcess:  # already reaped by shutdown()
        pass
    assert not psutil.pid_exists(first)
    second = ranch(2, where_am_i, caller_rank=None, gather=True)[0][1]
    assert second != first
