"""Big arguments kept in shared memory between launches: a warm launch copies only the pages the
caller wrote since the last one, and the ranks always see the caller's data as it was at the call,
whichever way it was written."""
import gc
import os
import shlex
import shutil
import subprocess
import threading
import time

import pytest

from helpers import python_script
from mpify import ranch, shutdown
from mpify.engine.start import pool
from mpify.engine.args import shm
from mpify.engine.args.resident import resident
from mpify.engine.args.writewatch import PAGE, WriteWatch

np = pytest.importorskip("numpy")
torch = pytest.importorskip("torch")

_probe = WriteWatch.open()
watching = pytest.mark.skipif(_probe is None, reason="no userfaultfd async write-protect on this kernel")
if _probe is not None:
    _probe.close()
MB = 1 << 20


@pytest.fixture(autouse=True)
def fresh_cache():
    shm.release()
    yield
    shm.release()


def ends(*arrays):
    """What a rank sees: a few chosen elements of each argument."""
    return [[float(a[i]) for i in (0, 1, 12345, -1)] for a in arrays]


def expect(*arrays):
    return [ends(*arrays)] * 2


def launch(*arrays):
    return ranch(2, ends, *arrays, caller_rank=None, gather=True)


@watching
def test_a_second_launch_copies_nothing_and_a_write_copies_its_page():
    arr = np.arange(4 * MB, dtype=np.float32)  # 16 MB
    ten = torch.arange(4 * MB, dtype=torch.float32)
    assert launch(arr, ten) == expect(arr, ten)
    assert shm.last_launch["copied"] >= 32 * MB
    # At most the two edge pages of each buffer, which it may share with other allocations of the
    # heap (malloc writes its neighbours' headers there): they count as written, and are copied.
    edges = 4 * PAGE
    assert launch(arr, ten) == expect(arr, ten)
    assert shm.last_launch["shared"] == 32 * MB and shm.last_launch["copied"] <= edges
    arr[12345] = -7.0
    ten[-1] = -8.0
    assert launch(arr, ten) == expect(arr, ten)
    assert 2 * PAGE <= shm.last_launch["copied"] <= 2 * PAGE + edges


@watching
def test_every_way_of_writing_reaches_the_ranks():
    arr = np.zeros(4 * MB, dtype=np.float32)
    ten = torch.zeros(4 * MB, dtype=torch.float32)
    writes = [
        ("numpy item", lambda: arr.__setitem__(1, 1.0)),
        ("torch in-place op", lambda: ten.add_(2.0)),
        ("through .data (its own version counter)", lambda: ten.data.__setitem__(12345, 3.0)),
        ("through a numpy view of the tensor", lambda: ten.numpy().__setitem__(-1, 4.0)),
        ("through torch.from_numpy", lambda: torch.from_numpy(arr).mul_(5.0)),
        ("np.copyto", lambda: np.copyto(arr, np.full_like(arr, 6.0))),
        ("the kernel, by read() into the buffer", lambda: _readinto(arr)),
        ("another thread", lambda: _in_thread(lambda: ten.__setitem__(0, 9.0))),
        ("a slice assignment", lambda: arr.__setitem__(slice(0, 2), 11.0)),
    ]
    for what, write in writes:
        write()
        assert launch(arr, ten) == expect(arr, ten), what


def _readinto(arr):
    with open("/dev/urandom", "rb") as f:
        f.readinto(memoryview(arr).cast("B")[:16 * PAGE])
    np.nan_to_num(arr[:4 * PAGE], copy=False)  # random bytes may be NaN, which never compares equal


def _in_thread(fn):
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def grow_in_rank_0(a):
    """Rank 0 is the caller and works on the caller's own array; the others must not see it."""
    if os.environ["RANK"] == "0":
        a += 1.0
        return float(a[0])
    time.sleep(0.5)
    return float(a[0])


@watching
def test_ranks_get_the_data_as_it_was_at_the_call_and_rank_0s_writes_reach_the_next_launch():
    arr = np.zeros(4 * MB, dtype=np.float64)
    assert ranch(3, grow_in_rank_0, arr, gather=True) == [1.0, 0.0, 0.0]
    assert arr[0] == 1.0  # the caller's rank 0 really changed it
    assert ranch(3, grow_in_rank_0, arr, gather=True) == [2.0, 1.0, 1.0]


@watching
def test_a_freed_argument_frees_its_snapshot_and_new_data_at_its_address_is_seen():
    launch(np.ones(4 * MB))  # opens the write watch, which stays
    gc.collect()
    fds = sorted(os.listdir("/proc/self/fd"))
    arr = np.full(4 * MB, 1.0, dtype=np.float32)
    assert launch(arr) == expect(arr)
    assert resident.held() >= 16 * MB
    ten = torch.full((4 * MB,), 1.0)
    assert launch(ten) == expect(ten)
    del arr, ten
    gc.collect()
    assert resident.held() == 0
    assert sorted(os.listdir("/proc/self/fd")) == fds
    for value in (2.0, 3.0):  # a new array, likely at the freed one's address
        arr = np.full(4 * MB, value, dtype=np.float32)
        assert launch(arr) == [[[value] * 4]] * 2
        del arr


@watching
def test_views_sharing_pages_are_all_refreshed():
    base = np.zeros(4 * MB + 3, dtype=np.float32)
    a, b = base[:-3], base[3:]  # the same pages, shifted by 12 bytes
    tail = torch.from_numpy(base[1:-2])  # and a tensor over them too
    for value in (1.0, 2.0):
        base[12348] = value
        base[12345] = value + 10
        assert launch(a, b, tail) == expect(a, b, tail)


def test_file_backed_and_shared_memory_is_copied_every_launch(tmp_path):
    # Another process can write a file's pages behind our back: never kept.
    path = tmp_path / "data.bin"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(4 * MB,))
    assert launch(mm) == [[[0.0] * 4]] * 2  # a memmap itself travels too (its file cannot)
    with open(path, "r+b") as f:  # not through mm
        f.seek(12345 * 4)
        f.write(np.float32(5.0).tobytes())
    assert launch(mm)[0][0][2] == 5.0
    assert shm.last_launch["copied"] == shm.last_launch["shared"] == 16 * MB
    import mmap
    shared = np.frombuffer(mmap.mmap(-1, 16 * MB), dtype=np.float32)  # MAP_SHARED: a child could write it
    for _ in range(2):
        assert launch(shared) == expect(shared)
        assert shm.last_launch["copied"] == 16 * MB


def test_the_cache_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("MPIFY_SHM_CACHE_MB", "0")
    arr = np.arange(4 * MB, dtype=np.float32)
    for _ in range(2):
        assert launch(arr) == expect(arr)
        assert shm.last_launch["copied"] == 16 * MB
    assert resident.held() == 0


@watching
def test_the_cache_stays_under_its_limit(monkeypatch):
    monkeypatch.setenv("MPIFY_SHM_CACHE_MB", "20")
    first = np.full(4 * MB, 1.0, dtype=np.float32)
    second = np.full(4 * MB, 2.0, dtype=np.float32)
    for arr in (first, second, first):
        assert launch(arr) == expect(arr)
        assert resident.held() <= 20 * MB
    assert launch(first, second) == expect(first, second)  # one is kept, one copied
    assert resident.held() <= 20 * MB


@watching
def test_shutdown_frees_the_snapshots():
    fds = sorted(os.listdir("/proc/self/fd"))
    arr = np.ones(4 * MB, dtype=np.float32)
    launch(arr)
    assert resident.held() > 0
    shutdown()
    assert resident.held() == 0
    assert set(os.listdir("/proc/self/fd")) <= set(fds)  # the forkserver's went too
    arr[5] = 3.0
    assert launch(arr) == expect(arr)


FORKED = """
import os, numpy as np
from mpify import ranch
def ends(a):
    return float(a[0]), float(a[-1])
arr = np.zeros(1 << 22, dtype=np.float32)
assert ranch(2, ends, arr, caller_rank=None) == (0.0, 0.0)
pid = os.fork()
if pid == 0:  # a forked caller: its own memory, its own snapshots
    arr[0] = 1.0
    ok = ranch(2, ends, arr, caller_rank=None) == (1.0, 0.0)
    os._exit(0 if ok else 3)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
arr[-1] = 2.0
assert ranch(2, ends, arr, caller_rank=None) == (0.0, 2.0)
print("OK")
"""


def test_a_caller_that_forks_keeps_correct_data_on_both_sides(tmp_path):
    out = subprocess.run(python_script(tmp_path, FORKED), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


DOCKER_SHM = """
import numpy as np
from mpify import ranch
arr = np.arange(64 << 20, dtype=np.float32)  # 256 MB
assert ranch(2, lambda a: float(a[-1]), arr, gather=True) == [float(arr[-1])] * 2
print("OK")
"""


FULL_DEV_SHM = """
import glob, numpy as np
from mpify import ranch, ShipError
from mpify.engine.start import pool
from mpify.engine.args import shm
shm._memfd_ok = False  # as off Linux: the arguments must go through files in /dev/shm
arr = np.arange(64 << 20, dtype=np.float32)  # 256 MB
try:
    ranch(2, lambda a: float(a[-1]), arr)
except ShipError as exc:
    print(exc)
print(glob.glob("/dev/shm/*"))
"""


def in_small_dev_shm(tmp_path, text):
    """Run a script where /dev/shm is 64 MB, as in a Docker container."""
    cmd = " ".join(shlex.quote(part) for part in python_script(tmp_path, text))
    return subprocess.run(["unshare", "-m", "sh", "-c", f"mount -t tmpfs -o size=64m tmpfs /dev/shm && {cmd}"],
                          capture_output=True, text=True, timeout=120)


needs_root = pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                                reason="needs root to mount a small /dev/shm")


@needs_root
def test_a_small_dev_shm_does_not_limit_arguments(tmp_path):
    # The memfds do not live in /dev/shm.
    out = in_small_dev_shm(tmp_path, DOCKER_SHM)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


@needs_root
def test_a_full_dev_shm_is_one_clear_error_and_leaves_nothing(tmp_path):
    out = in_small_dev_shm(tmp_path, FULL_DEV_SHM)
    assert out.returncode == 0, out.stderr[-3000:]
    message, leftovers = out.stdout.strip().splitlines()
    assert message.startswith("a large argument could not be put in shared memory for the ranks: ")
    assert "No space left on device" in message
    assert leftovers == "[]"


def digest(a):
    import hashlib
    return hashlib.sha1(memoryview(a).cast("B")).hexdigest()


@watching
def test_writes_racing_the_launches_are_never_lost():
    # A thread scribbles all over the array while launches go on. A launch may see any mix of
    # old and new (as with any copy of data being written), but once the writes stop, the next
    # launch must see exactly the caller's data: no write was lost between scan and copy.
    arr = np.zeros(4 * MB, dtype=np.uint32)
    stop = threading.Event()

    def scribble():
        rng = np.random.default_rng(0)
        while not stop.is_set():
            idx = rng.integers(0, arr.size, 64)
            arr[idx] = rng.integers(1, 1 << 31, 64, dtype=np.uint32)

    writer = threading.Thread(target=scribble)
    writer.start()
    try:
        for _ in range(8):
            ranch(2, digest, arr, caller_rank=None)
    finally:
        stop.set()
        writer.join()
    assert ranch(2, digest, arr, caller_rank=None, gather=True) == [digest(arr)] * 2


NO_USERFAULTFD = """
import ctypes, os, struct
import numpy as np
from mpify import ranch
from mpify.engine.start import pool
from mpify.engine.args import shm
from mpify.engine.args.writewatch import WriteWatch

# A seccomp filter that refuses userfaultfd with EPERM, as Docker's default profile does.
ops = [(0x20, 0, 0, 0),                 # load the syscall number
       (0x15, 0, 1, 323),               # userfaultfd?
       (0x06, 0, 0, 0x00050000 | 1),    # then fail with EPERM
       (0x06, 0, 0, 0x7fff0000)]        # else allow
code = b"".join(struct.pack("HBBI", *op) for op in ops)
buf = ctypes.create_string_buffer(code)
prog = struct.pack("HxxxxxxQ", len(ops), ctypes.addressof(buf))
prog_buf = ctypes.create_string_buffer(prog)
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl(38, 1, 0, 0, 0) == 0  # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.c_void_p(ctypes.addressof(prog_buf)), 0, 0) == 0, ctypes.get_errno()  # SECCOMP_MODE_FILTER
assert WriteWatch.open() is None

arr = np.arange(4 << 20, dtype=np.float32)
for value in (1.0, 2.0):
    arr[12345] = value
    assert ranch(2, lambda a: float(a[12345]), arr, gather=True) == [value] * 2
    assert shm.last_launch == {"shared": arr.nbytes, "copied": arr.nbytes}  # a full copy each launch
print("OK")
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the filter names x86_64's syscall number")
def test_where_userfaultfd_is_refused_every_launch_copies(tmp_path):
    out = subprocess.run(python_script(tmp_path, NO_USERFAULTFD), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "OK", out.stderr[-3000:]


def test_many_launches_with_fresh_arguments_leave_no_fd_or_snapshot_behind():
    # A notebook loop: a new batch every launch (the old one dies), the same dataset each time.
    dataset = np.arange(4 * MB, dtype=np.float32)
    launch(dataset, np.ones(MB, dtype=np.float32))  # warm up: forkserver, write watch
    # The complete forkserver started after the first launch takes over (the quick one retires
    # and its alive pipe closes): fds of forkservers coming and going are not a launch's leak.
    pool.wait_complete()
    launch(dataset, np.ones(MB, dtype=np.float32))
    gc.collect()
    fds = sorted(os.listdir("/proc/self/fd"))
    for i in range(30):
        batch = np.full(MB + i, float(i), dtype=np.float32)  # 4 MB, a new owner each time
        assert launch(dataset, batch) == expect(dataset, batch)
        del batch
    gc.collect()
    assert sorted(os.listdir("/proc/self/fd")) == fds
    assert resident.held() <= dataset.nbytes + 2 * PAGE


def nested_inner(x):
    return digest(x)


def nested_outer(x):
    if os.environ["RANK"] == "0":
        x[:] = 1.0  # rank 0 works on the caller's own array...
        ranch(1, nested_inner, x, caller_rank=None)  # ...and launches again with it
        return digest(x)
    time.sleep(1.0)  # reads after the nested launch
    return digest(x)


def test_a_nested_launch_leaves_the_outer_ranks_data_as_it_was():
    # Found by user testing: the nested launch refreshed the snapshot that the outer ranks map
    # copy-on-write, and rank 1 saw rank 0's later writes.
    arr = np.zeros(1 << 18)  # 2 MB
    launch(arr)  # a snapshot exists before the outer launch
    at_call = digest(arr)
    assert ranch(2, nested_outer, arr, gather=True)[1] == at_call
    assert launch(arr) == expect(arr)  # and the next launch sees the writes


def test_a_tensor_passed_to_a_launch_can_still_be_resized():
    # Found by user testing: the bytes were read through .numpy(), which makes a storage
    # non-resizable for good, so `t.resize_()` failed after any launch (small tensors too).
    for n in (4 * MB, 16):
        t = torch.zeros(n)
        ranch(2, torch.sum, t)
        t.resize_(2 * n)
        assert t.shape == (2 * n,)


@watching
def test_an_array_kept_between_launches_resizes_after_shutdown():
    # As the README says: numpy refuses an in-place resize while mpify's weak reference exists.
    arr = np.zeros(4 * MB, dtype=np.float32)
    launch(arr)
    with pytest.raises(ValueError, match="cannot resize"):
        arr.resize(8 * MB)
    shutdown()
    arr.resize(8 * MB)
    assert arr.shape == (8 * MB,)
