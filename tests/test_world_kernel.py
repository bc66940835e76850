"""A live world in a real Jupyter kernel: `%load_ext mpify`, `%mpify start`, `%%ranch` cells,
Jupyter's own interrupt, SIGKILLed ranks, kernel shutdown and death."""
from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest

from conftest import jupyter_kernel
from helpers import alive, wait_gone

START = "%load_ext mpify\n%mpify start 3 --ddp"
PIDS = "%%ranch\nimport os, time, torch, torch.distributed as dist\nprint('PID', os.getpid())"
CHECK = ("%%ranch\nx = torch.ones(1) * (dist.get_rank() + 1)\ndist.all_reduce(x)\n"
         "print('SUM', int(x.item()), 'PID', os.getpid())")


class Cell:
    """What a cell showed: its reply, its streams, its results and errors, how long it took."""

    def __init__(self, reply: dict, msgs: list, took: float):
        self.reply, self.msgs, self.took = reply, msgs, took
        self.status = reply["content"]["status"]
        self.stdout = "".join(m["content"]["text"] for m in msgs
                              if m["msg_type"] == "stream" and m["content"]["name"] == "stdout")
        self.stderr = "".join(m["content"]["text"] for m in msgs
                              if m["msg_type"] == "stream" and m["content"]["name"] == "stderr")
        self.results = [m["content"]["data"]["text/plain"] for m in msgs if m["msg_type"] == "execute_result"]
        self.errors = [m["content"] for m in msgs if m["msg_type"] == "error"]

    def pids(self) -> set[int]:
        return {int(p) for p in re.findall(r"PID (\d+)", self.stdout)}


def collect(kc, msg_id: str, start: float, timeout: float) -> Cell:
    msgs = []
    deadline = time.monotonic() + timeout
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
        msgs.append(msg)
    took = time.monotonic() - start
    reply = kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = kc.get_shell_msg(timeout=max(1, deadline - time.monotonic()))
    return Cell(reply, msgs, took)


def run(kc, code: str, timeout: float = 120) -> Cell:
    start = time.monotonic()
    return collect(kc, kc.execute(code), start, timeout)


def wait_for_output(kc, msg_id: str, needle: str, timeout: float = 60) -> list:
    """Read the cell's iopub messages until `needle` shows in its output."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") == msg_id:
            seen.append(msg)
            if msg["msg_type"] == "stream" and needle in msg["content"]["text"]:
                return seen
    raise AssertionError(f"{needle!r} never shown")


def interrupted_cell(km, kc, code: str, needle: str, timeout: float = 30) -> Cell:
    """Run `code`, send Jupyter's interrupt once `needle` shows, return the cell as it ended."""
    msg_id = kc.execute(code)
    early = wait_for_output(kc, msg_id, needle)
    time.sleep(0.3)
    start = time.monotonic()
    km.interrupt_kernel()
    cell = collect(kc, msg_id, start, timeout)
    cell.msgs = early + cell.msgs
    return cell


def ranks_of(kc) -> set[int]:
    cell = run(kc, PIDS)
    assert cell.status == "ok", cell.errors
    return cell.pids()


def check_world(kc, pids: set[int]) -> None:
    """Every rank answers an all_reduce right, and they are the same processes as before."""
    cell = run(kc, CHECK)
    assert cell.status == "ok", cell.errors
    assert cell.stdout.count("SUM 6") == 3, cell.stdout
    assert cell.pids() == pids


@pytest.fixture(scope="module")
def kernel(kernel_name):
    with jupyter_kernel(kernel_name) as (km, kc):
        yield km, kc


@pytest.fixture
def world(kernel):
    """A 3-rank DDP world in the shared kernel, stopped afterwards; yields its ranks' pids."""
    km, kc = kernel
    cell = run(kc, START)
    assert cell.status == "ok", cell.errors
    pids = ranks_of(kc)
    assert len(pids) == 3
    yield km, kc, pids
    run(kc, "%mpify stop")
    kernel_pid = km.provisioner.process.pid
    assert not wait_gone(pids - {kernel_pid}, 5.0)


def test_state_lives_across_cells(world):
    km, kc, pids = world
    build = run(kc, "%%ranch\nfrom torch.nn.parallel import DistributedDataParallel as DDP\n"
                    "torch.manual_seed(0)\nmodel = DDP(torch.nn.Linear(4, 1))\n"
                    "opt = torch.optim.SGD(model.parameters(), lr=0.1)\ndist.get_rank()")
    assert build.status == "ok", build.errors
    assert build.results == ["0"]  # rank 0's last expression is the cell's Out
    assert "[rank 1] 1" in build.stdout and "[rank 2] 2" in build.stdout  # theirs, prefixed
    train = ("%%ranch\nfor step in range(5):\n    torch.manual_seed(dist.get_rank() * 100 + step)\n"
             "    loss = model(torch.randn(8, 4)).pow(2).mean()\n"
             "    opt.zero_grad(); loss.backward(); opt.step()\n"
             "w = model.module.weight.detach().clone()\n"
             "every = [torch.zeros_like(w) for _ in range(dist.get_world_size())]\n"
             "dist.all_gather(every, w)\n"
             "print('EQUAL', all(torch.equal(e, every[0]) for e in every))")
    for _ in range(2):  # trained in one cell, then again in the next: the model lived
        cell = run(kc, train)
        assert cell.status == "ok", cell.errors
        assert cell.stdout.count("EQUAL True") == 3, cell.stdout
    # rank 0's model is the kernel's own: a plain cell uses it
    plain = run(kc, "import torch as _t\nprint('PLAIN', _t.allclose(model.module.weight, w), "
                    "model.module.weight.shape)")
    assert plain.status == "ok" and "PLAIN True torch.Size([1, 4])" in plain.stdout
    # the same model was trained 10 steps: the weights moved from their seed-0 start
    moved = run(kc, "torch.manual_seed(0)\nfresh = torch.nn.Linear(4, 1)\n"
                    "print('MOVED', not torch.allclose(fresh.weight, model.module.weight))")
    assert "MOVED True" in moved.stdout
    # some ranks only
    some = run(kc, "%%ranch --ranks 1,2\nprint('ONLY', dist.get_rank())")
    assert some.status == "ok" and "ONLY" not in some.stdout.replace("[rank 1] ONLY", "").replace("[rank 2] ONLY", "")
    assert "[rank 1] ONLY 1" in some.stdout and "[rank 2] ONLY 2" in some.stdout
    check_world(kc, pids)


def test_a_rank_that_raises(world):
    km, kc, pids = world
    cell = run(kc, "%%ranch\nif dist.get_rank() == 2:\n    raise ValueError('rank 2 says no')\n'fine'")
    assert cell.status == "error"
    assert cell.errors[0]["ename"] == "ValueError" and cell.errors[0]["evalue"] == "rank 2 says no", cell.errors
    assert any("raised in rank 2 of 3" in line for line in cell.errors[0]["traceback"])
    # what %debug reads: IPython kept the exception, traceback and all
    last = run(kc, "import sys\nprint('LAST', type(sys.last_value).__name__, sys.last_traceback is not None)")
    assert "LAST ValueError True" in last.stdout
    # rank 0's own error points at the cell's line
    own = run(kc, "%%ranch --ranks 0\nx = 1\nundefined_name + x")
    assert own.errors[0]["ename"] == "NameError"
    assert any("undefined_name + x" in line for line in own.errors[0]["traceback"])
    check_world(kc, pids)


def test_auto_mode_sends_every_cell_to_every_rank(world):
    km, kc, pids = world
    assert run(kc, "%mpify auto on").status == "ok"
    cell = run(kc, "print('AUTO', dist.get_rank())")
    assert cell.stdout.count("AUTO") == 3 and "[rank 2] AUTO 2" in cell.stdout
    assert run(kc, "%mpify auto off").status == "ok"
    cell = run(kc, "print('PLAIN', dist.get_rank())")
    assert cell.stdout.strip() == "PLAIN 0"


@pytest.mark.parametrize("who", [0, 1])
def test_a_rank_raises_while_the_others_wait_in_a_collective(world, who):
    km, kc, pids = world
    # the others are surely inside the all_reduce when the rank raises
    cell = run(kc, f"%%ranch\nx = torch.ones(1)\nif dist.get_rank() == {who}:\n    time.sleep(1)\n"
                   "    raise KeyError('gone')\ndist.all_reduce(x)", timeout=60)
    assert cell.status == "error" and cell.errors[0]["ename"] == "KeyError"
    assert cell.took < 9, f"took {cell.took:.1f} s"
    text = "\n".join(cell.errors[0]["traceback"])
    assert f"raised in rank {who} of 3" in text and "process group was rebuilt" in text
    check_world(kc, pids)


def test_interrupt_during_a_long_cell(world):
    km, kc, pids = world
    cell = interrupted_cell(km, kc, "%%ranch\nprint('GO', flush=True)\nfor i in range(600):\n"
                                    "    x = torch.ones(1); dist.all_reduce(x); time.sleep(0.05)", "GO")
    assert cell.status == "error" and cell.errors[0]["ename"] == "KeyboardInterrupt"
    assert cell.took < 8, f"took {cell.took:.1f} s"
    check_world(kc, pids)


@pytest.mark.parametrize("who", [0, 2], ids=["rank 0", "a child"])
def test_interrupt_frees_a_rank_stuck_alone_in_a_collective(world, who):
    km, kc, pids = world
    cell = interrupted_cell(km, kc, f"%%ranch --ranks {who}\nprint('GO', flush=True)\n"
                                    "x = torch.ones(1); dist.all_reduce(x)", "GO")
    assert cell.status == "error" and cell.errors[0]["ename"] == "KeyboardInterrupt"
    assert cell.took < 8, f"took {cell.took:.1f} s"
    check_world(kc, pids)


def test_interrupt_frees_a_plain_cell_stuck_alone_in_a_collective(world):
    km, kc, pids = world
    cell = interrupted_cell(km, kc, "print('GO', flush=True)\nx = torch.ones(1); dist.all_reduce(x)", "GO")
    assert cell.status == "error" and cell.errors[0]["ename"] == "KeyboardInterrupt"
    assert cell.took < 8, f"took {cell.took:.1f} s"
    assert "will be rebuilt at the next %%ranch cell" in cell.stderr
    check_world(kc, pids)
    # the kernel's own interrupt handling is intact: a plain busy cell is interrupted as usual
    plain = interrupted_cell(km, kc, "print('GO', flush=True)\nwhile True:\n    pass", "GO")
    assert plain.status == "error" and plain.errors[0]["ename"] == "KeyboardInterrupt" and plain.took < 3


def test_twenty_cells_leak_no_file_descriptor(world):
    km, kc, pids = world
    kernel = psutil.Process(km.provisioner.process.pid)

    def fds() -> list[str]:  # what they are, for the failure message
        return sorted(f.path for f in kernel.open_files()) + [str(c.laddr) for c in kernel.net_connections()]

    for _ in range(3):  # the kernel opens a few things of its own lazily (history, completions)
        run(kc, "%%ranch\n1")
    before = kernel.num_fds()
    children = {pid: psutil.Process(pid).num_fds() for pid in pids - {kernel.pid}}
    for i in range(20):
        cell = run(kc, f"%%ranch\nprint('CELL', {i})")
        assert cell.status == "ok" and cell.stdout.count(f"CELL {i}") == 3
    # one descriptor lost per cell would show as 20 here
    assert kernel.num_fds() - before <= 2, (before, kernel.num_fds(), fds())
    for pid, count in children.items():
        assert psutil.Process(pid).num_fds() - count <= 2


def test_a_rank_killed(kernel):
    km, kc = kernel
    assert run(kc, START).status == "ok"
    pids = ranks_of(kc)
    kernel_pid = km.provisioner.process.pid
    victim = max(pids - {kernel_pid})
    run(kc, "kept = 'the kernel keeps its namespace'")
    msg_id = kc.execute("%%ranch\nprint('GO', flush=True)\nx = torch.ones(1); dist.all_reduce(x)\n"
                        "time.sleep(30)\ndist.all_reduce(x)")
    early = wait_for_output(kc, msg_id, "GO")
    time.sleep(0.5)
    start = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    cell = collect(kc, msg_id, start, 30)
    cell.msgs = early + cell.msgs
    assert cell.status == "error" and cell.errors[0]["ename"] == "RankDiedError"
    assert "SIGKILL" in cell.errors[0]["evalue"] and f"rank {2 if victim else 1}" in cell.errors[0]["evalue"]
    assert cell.took < 3, f"took {cell.took:.1f} s"
    assert not wait_gone(pids - {kernel_pid}, 5.0)
    after = run(kc, "print(kept)\n%mpify status")
    assert "the kernel keeps its namespace" in after.stdout and "the world is closed" in after.stdout
    closed = run(kc, "%%ranch\n1")
    assert closed.status == "error" and closed.errors[0]["ename"] == "WorldClosedError"
    # a new world starts in the same kernel
    assert run(kc, START).status == "ok"
    fresh = ranks_of(kc)
    assert len(fresh) == 3 and not (fresh - {kernel_pid}) & pids
    check_world(kc, fresh)
    run(kc, "%mpify stop")
    assert not wait_gone(fresh - {kernel_pid}, 5.0)


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_no_rank_outlives_its_kernel(kernel_name, how):
    with jupyter_kernel(kernel_name) as (km, kc):
        assert run(kc, START).status == "ok"
        pids = ranks_of(kc) - {km.provisioner.process.pid}
        assert len(pids) == 2 and alive(pids)
        if how == "shutdown":
            km.shutdown_kernel(now=False)
        else:
            km.provisioner.process.send_signal(signal.SIGKILL)
        assert not wait_gone(pids, 5.0), f"ranks outlived the kernel ({how})"


def test_the_live_world_sample_notebook(shared_kernel, tmp_path):
    """sample_notebooks/live_world.ipynb end to end in a real kernel: build once, train, look at
    rank 0's model in a plain cell, train more; every rank gone at the end. In the session's
    shared kernel (conftest.SharedKernel), as a notebook opened after others."""
    import nbformat

    path = os.path.join(os.path.dirname(__file__), "..", "sample_notebooks", "live_world.ipynb")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = {"name": shared_kernel.kernel_name, "display_name": "mpify test", "language": "python"}
    shared_kernel.run(nb, tmp_path)
    code = [c for c in nb.cells if c.cell_type == "code"]
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, errors
    text = "\n".join(o.get("text", "") for c in code for o in c.outputs if o.output_type == "stream")
    assert text.count("replicas equal: True") == 3
    assert "[rank 1] rank 1 of 3" in text and "[rank 2] rank 2 of 3" in text
    first, now = (float(v) for v in re.search(r"data now: ([\d.]+) \(was ([\d.]+)\)", text).groups()[::-1])
    assert now < first  # training more in a later cell went on from the same model
    ranks = {int(p) for p in re.findall(r"\[rank \d\] rank \d of 3, pid (\d+)", text)}
    assert len(ranks) == 2 and not wait_gone(ranks, 5.0)
