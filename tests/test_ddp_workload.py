"""The workload mpify exists for: a training function written for torchrun (it creates its own
process group, wraps its model in DistributedDataParallel, trains, destroys the group, returns),
launched again and again from one process or one notebook kernel.

What a user would see go wrong, and what these tests hold:
- the kernel freezing for good when fn returns (DDP's reducer destroying the last reference to
  its gloo group with the GIL held; engine/rank/groups.py): 100 launches in a row finish;
- gloo's and the store's threads staying in the caller after the launch, so that a later
  `os.fork()` (DataLoader workers, fork-based launchers) copies a process with live gloo threads;
- the store or gloo listening on every interface during a one-machine launch;
- a helper module beside the notebook, or mpify itself installed with `pip install --target`,
  failing to reach the ranks;
- CUDA and pinned tensors as arguments (skipped without a GPU).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from nbformat.v4 import new_code_cell, new_notebook

from helpers import die_with_parent

torch = pytest.importorskip("torch")

REPO = Path(__file__).resolve().parent.parent

# The torchrun-style function, as users write it (no TorchDDPCtx): its own group, DDP, destroy.
TRAIN = '''
import os
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP


def train(steps=3):
    dist.init_process_group("gloo")
    model = DDP(nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(4, 8)).sum().backward()
        opt.step()
    weight = model.module.weight.detach().clone()
    dist.all_reduce(weight)
    dist.destroy_process_group()
    return int(os.environ["RANK"]), float(weight.sum())
'''

THREADS = '''
def threads():
    """Thread names of this process, native ones included (gloo's are C++ threads)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except (FileNotFoundError, ProcessLookupError):  # a thread that ended since the listing
            pass  # (open fails, or the read does: ESRCH)
    return sorted(names)


def launch_threads(settle=5.0):
    """The launch threads still alive, once given `settle` seconds to end: the TCPStore's libuv
    thread ends after its store is dropped, not with it (seen alive right after the 100th launch
    on a loaded machine)."""
    import time
    deadline = time.monotonic() + settle
    while True:
        left = [t for t in threads() if t.startswith(("gloo", "pt_gloo", "pt_tcpstore", "mpify"))]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)
'''


def run_script(tmp_path, body: str, timeout: float = 240, cwd=None, env=None) -> subprocess.CompletedProcess:
    path = tmp_path / "script.py"
    path.write_text(TRAIN + THREADS + textwrap.dedent(body))
    return subprocess.run([sys.executable, "-u", str(path)], capture_output=True, text=True, timeout=timeout,
                          cwd=cwd or tmp_path, env=env, preexec_fn=die_with_parent)


# One fresh process (one torch import, one forkserver start) runs the script parts of the tests
# below, one after another, each printing what its test asserts: a hundred launches with the
# caller as rank 0, a hundred with every rank a child, the launches that listen on loopback only,
# then three DDP launches, a raise and twenty forks, after which the process must exit by itself.
SHARED = """
import sys
from mpify import ranch, torchddp_launch

hook = sys.excepthook  # on 3.10 the exceptiongroup backport has replaced it already

# -- a hundred torchrun-style launches finish, for each caller_rank
for caller_rank in (0, None):
    for i in range(100):
        out = ranch(2, train, caller_rank=caller_rank, gather=True)
        assert [r for r, _ in out] == [0, 1], out
        assert out[0][1] == out[1][1], out  # all_reduce gave both ranks the same sum
    print("caller_rank", caller_rank, "launches", i + 1, "threads", launch_threads())
# each init_process_group in rank 0 wrapped sys.excepthook (torch's [rankN] prefix): put back
print("excepthook as before", sys.excepthook is hook)

# -- one machine: listening on loopback only
import psutil

def listening(pid):
    return sorted({c.laddr.ip for c in psutil.Process(pid).net_connections("tcp")
                   if c.status == psutil.CONN_LISTEN})

def look():
    dist.all_reduce(torch.ones(1))
    mine = listening(os.getpid())
    caller = listening(os.getppid()) if os.environ["RANK"] != "0" else mine
    dist.barrier()
    return mine, caller

print("ddp", torchddp_launch(2, look, gather=True))
def own_group():
    dist.init_process_group("gloo")
    try:
        return look()
    finally:
        dist.destroy_process_group()
print("own", ranch(2, own_group, caller_rank=None, gather=True))

# -- after DDP launches nothing stays, and forks are clean
def in_ctx():
    model = DDP(nn.Linear(8, 1))
    model(torch.randn(4, 8)).sum().backward()
    return 1

def rank0_raises():
    dist.init_process_group("gloo")
    model = DDP(nn.Linear(8, 1))
    model(torch.randn(4, 8)).sum().backward()
    if os.environ["RANK"] == "0":
        raise ValueError("rank 0 gives up")
    dist.barrier()

ranch(2, train)
torchddp_launch(2, in_ctx)
ranch(2, train, caller_rank=None)
print("after three", launch_threads())
try:
    ranch(2, rank0_raises)
except ValueError as exc:
    error = exc  # kept, traceback and all, as a notebook keeps sys.last_traceback
print("after a raise", launch_threads(), type(error).__name__)

pids = []
for _ in range(20):
    pid = os.fork()
    if pid == 0:
        x = torch.randn(64, 64) @ torch.randn(64, 64)
        os._exit(0 if x.shape == (64, 64) else 3)
    pids.append(pid)
codes = [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids]
print("forks", codes)
"""


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    """SHARED run once in a fresh interpreter; its return code and output."""
    tmp = tmp_path_factory.mktemp("ddp_workload")
    proc = run_script(tmp, SHARED, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.mark.timeout(600)
@pytest.mark.parametrize("caller_rank", [0, None], ids=["kernel-is-rank0", "all-ranks-children"])
def test_a_hundred_torchrun_style_launches_finish(shared_run, caller_rank, no_strays):
    assert f"caller_rank {caller_rank} launches 100 threads []" in shared_run.stdout
    assert "excepthook as before True" in shared_run.stdout


def test_a_function_that_imports_torch_itself(tmp_path, no_strays):
    """The caller never imported torch: fn does (its groups are then caught by an import watcher,
    engine/rank/groups.py). Twenty launches, then no gloo or store thread in the caller."""
    path = tmp_path / "script.py"
    path.write_text(THREADS + textwrap.dedent('''
        import sys
        from mpify import ranch

        def train():
            import torch, torch.distributed as dist, torch.nn as nn
            from torch.nn.parallel import DistributedDataParallel as DDP
            dist.init_process_group("gloo")
            model = DDP(nn.Linear(8, 1))
            model(torch.randn(4, 8)).sum().backward()
            dist.destroy_process_group()
            return int(os.environ["RANK"])

        print("torch before", "torch" in sys.modules)
        print("ranks", [ranch(2, train, gather=True) for _ in range(20)] == [[0, 1]] * 20, launch_threads())
    '''))
    proc = subprocess.run([sys.executable, "-u", "-c", "import os\n" + path.read_text()], capture_output=True,
                          text=True, timeout=240, cwd=tmp_path, preexec_fn=die_with_parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch before False" in proc.stdout
    assert "ranks True []" in proc.stdout


@pytest.mark.timeout(600)
def test_after_ddp_launches_nothing_stays_and_forks_are_clean(shared_run, no_strays):
    """Three DDP launches (torchrun-style, in TorchDDPCtx, and one where rank 0 raised with its
    DDP model still in the traceback), then: no gloo or store thread in the caller, 20 forked
    children that use torch exit cleanly, and the process exits by itself (SHARED's last part)."""
    assert "after three []" in shared_run.stdout
    assert "after a raise [] ValueError" in shared_run.stdout
    assert "forks " + str([0] * 20) in shared_run.stdout


def test_a_hundred_launches_in_a_real_kernel(shared_kernel, tmp_path):
    cells = [TRAIN + THREADS + "\nfrom mpify import ranch",
             "sums = set()\nfor i in range(100):\n    out = ranch(2, train, gather=True)\n"
             "    sums.add(out[0][1] == out[1][1])\nprint('done', i + 1, sums)",
             "print('threads', launch_threads())"]
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    shared_kernel.run(nb, tmp_path, timeout=240)
    out = "".join(o.get("text", "") for c in nb.cells for o in c.outputs if o.output_type == "stream")
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    assert "done 100 {True}" in out
    assert "threads []" in out


def test_helper_module_beside_the_notebook_reaches_three_ranks(shared_kernel, tmp_path):
    """A helpers.py next to the notebook, holding a lock and a thread-local (neither can be
    pickled): it travels by name, each rank imports it from the notebook's folder."""
    (tmp_path / "helpers.py").write_text(textwrap.dedent('''
        import threading

        _lock = threading.Lock()
        _seen = threading.local()


        def tally(x):
            with _lock:
                _seen.total = getattr(_seen, "total", 0) + x
                return _seen.total
    '''))
    cells = ["import os\nimport helpers\nfrom mpify import ranch",
             "def work(x):\n    return helpers.tally(x * (int(os.environ['RANK']) + 1)), helpers.__file__",
             "print(ranch(3, work, 10, gather=True))"]
    nb = new_notebook(cells=[new_code_cell(c) for c in cells])
    shared_kernel.run(nb, tmp_path)
    errors = [o for c in nb.cells for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    where = str(tmp_path / "helpers.py")
    expected = str([(10, where), (20, where), (30, where)])
    assert expected in "".join(o.get("text", "") for o in nb.cells[2].outputs)


def test_installed_with_pip_target_outside_site_packages(tmp_path, no_strays):
    """mpify and its pickler installed with `pip install --target DIR` (a folder not named
    site-packages) on PYTHONPATH: dill would pickle every one of those modules by value."""
    target = tmp_path / "libs"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(REPO)], check=True, capture_output=True, timeout=300)
    import dill
    import multiprocess
    for module in (dill, multiprocess):  # the pickler and the process library from DIR too
        shutil.copytree(Path(module.__file__).parent, target / module.__name__)
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    script = textwrap.dedent('''
        import os, mpify, dill, multiprocess
        from mpify import ranch

        def where(x):
            return int(os.environ["RANK"]) * x, os.path.dirname(os.path.dirname(mpify.__file__))

        print(ranch(3, where, 5, gather=True), os.path.dirname(os.path.dirname(dill.__file__)))
    ''')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=work, env=env,
                          timeout=120, preexec_fn=die_with_parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == f"{[(0, str(target)), (5, str(target)), (10, str(target))]} {target}"


@pytest.mark.timeout(600)
def test_one_machine_launch_listens_on_loopback_only(shared_run, no_strays):
    """While the ranks are in init/all_reduce, every listening socket of the caller (the store
    it hosts) and of each rank (gloo's) is on 127.0.0.1 (SHARED's second part)."""
    lines = dict(line.split(" ", 1) for line in shared_run.stdout.splitlines() if line.startswith(("ddp ", "own ")))
    assert set(lines) == {"ddp", "own"}
    for key, text in lines.items():
        results = eval(text)
        for mine, caller in results:
            assert mine and set(mine) == {"127.0.0.1"}, (key, mine)
    ddp = eval(lines["ddp"])
    assert set(ddp[0][1]) == {"127.0.0.1"}  # the caller hosts the store: loopback only


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
def test_cuda_and_pinned_tensor_arguments(tmp_path, no_strays):
    """A CUDA tensor travels as an IPC handle; every rank gets its own copy on the same device;
    a pinned tensor arrives pinned; the caller's tensor is untouched by the ranks' writes."""
    proc = run_script(tmp_path, '''
        from mpify import ranch

        def use(t, p):
            rank = int(os.environ["RANK"])
            t.add_(rank)  # a copy: the caller's tensor must not change
            return str(t.device), float(t[0]), p.is_pinned(), float(p.sum())

        t = torch.zeros(64 << 20, device="cuda")  # 256 MB
        p = torch.ones(1000).pin_memory()
        out = ranch(2, use, t, p, caller_rank=None, gather=True)
        print("out", out, float(t.sum()))
    ''')
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "out [('cuda:0', 0.0, True, 1000.0), ('cuda:0', 1.0, True, 1000.0)] 0.0" in proc.stdout
