"""A live world across two nodes of a real Slurm cluster (tests/slurm_cluster.py): the caller is
rank 0 on the batch step's node, the other node's ranks live in that node's resident process
(started by srun), and the state of every rank lasts from one cell to the next.

Each job runs a plain script (a notebook inside an allocation does the same calls through
%mpify start --slurm; tests/test_slurm_kernel.py drives one in a real kernel)."""
from __future__ import annotations

import ast
import sys
import time

import pytest

from test_slurm_launch import job_processes

pytestmark = pytest.mark.timeout(400)

WORLD = r'''
import os, signal, time
from mpify import World, RankDiedError, WorldClosedError

w = World(2, launcher="slurm", ddp=True)
print("STATUS", repr([(r["rank"], r["node"], r["alive"]) for r in w.status()]), flush=True)
# cell 1: every rank keeps its own tensor, and notes where it runs
w.exec("import os, torch, torch.distributed as dist\n"
       "x = torch.tensor([float(os.environ['RANK']) + 1])\n"
       "where = (os.environ.get('SLURMD_NODENAME'), os.environ.get('SLURM_STEP_ID'), os.getpid())\n"
       "print('made x on', where[0], flush=True)")
# cell 2: reads cell 1's state, an all_reduce across the nodes
w.exec("dist.all_reduce(x)\ny = x.item() * 10")
print("PULL", repr((w.pull("y", 3), w.pull("where", 2), w.pull("where", 1))), flush=True)
print("RUN", repr(w.run(lambda: (int(os.environ["RANK"]), os.environ.get("SLURMD_NODENAME")), gather=True)), flush=True)
shared = [1, 2, 3]  # rank 0 is this process: it binds its own
w.push(shared=shared)
print("PUSHED", repr(w.run(lambda: sum(shared) + int(os.environ["RANK"]), gather=True)), flush=True)
# a remote rank raises in a cell: the error names it and its node; the world goes on
try:
    w.exec("if os.environ['RANK'] == '3':\n    raise ValueError('bad on rank 3')")
except ValueError as e:
    print("RAISED", repr((str(e), e.mpify_rank, " | ".join(e.__notes__))), flush=True)
print("STILL", repr(w.run(lambda: y, gather=True)), flush=True)
w.close()
print("CLOSED", repr(w.closed), flush=True)

# a remote rank SIGKILLed in a cell: RankDiedError with its rank and node, the world closed
w = World(2, launcher="slurm")
t0 = time.monotonic()
try:
    w.exec("import os, signal, time\n"
           "if os.environ['RANK'] == '3':\n    time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)\n"
           "time.sleep(30)")
except RankDiedError as e:
    print("DIED", repr((e.rank, " | ".join(getattr(e, "__notes__", [])), round(time.monotonic() - t0, 1))), flush=True)
try:
    w.run(lambda: 1)
except WorldClosedError as e:
    print("REFUSED", repr(str(e)), flush=True)
# a remote rank SIGKILLed between cells (it kills itself half a second after its cell ended):
# the world says so at once and closes
w4 = World(2, launcher="slurm")
w4.exec("import os, signal, threading\nif os.environ['RANK'] == '3':\n"
        "    threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()")
time.sleep(0.5)
t0 = time.monotonic()
while not w4.closed and time.monotonic() - t0 < 10:
    time.sleep(0.05)
print("BETWEEN", repr((w4.closed, round(time.monotonic() - t0, 1), str(w4.lost_reason))), flush=True)
w4.close()
# a fresh world after it, on the same nodes
with World(2, launcher="slurm") as w2:
    print("AGAIN", repr(w2.run(lambda: int(os.environ["RANK"]), gather=True)), flush=True)
# rank 1 gives up while the others wait in an all_reduce across the nodes: the error, and the
# stuck ranks freed (rank 0 too, whose peers are on the other node); the world is closed
w3 = World(2, launcher="slurm", ddp=True)
t0 = time.monotonic()
try:
    w3.exec("import os, torch, torch.distributed as dist\n"
            "if os.environ['RANK'] == '1':\n    raise ValueError('rank 1 gave up')\n"
            "t = torch.ones(1)\ndist.all_reduce(t)")
except ValueError as e:
    print("STUCK", repr((e.mpify_rank, round(time.monotonic() - t0, 1), w3.closed)), flush=True)
w3.close()
print("DONE", flush=True)
'''


def _run_job(cluster, tmp_path, name: str, text: str) -> str:
    script = tmp_path / f"{name}.py"
    script.write_text(text)
    job = tmp_path / f"{name}.sh"
    job.write_text(f"#!/bin/sh\nexec {sys.executable} -u {script}\n")
    out = tmp_path / f"{name}.out"
    done = cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp_path), str(job)],
                       timeout=300, check=False)
    log = out.read_text() if out.exists() else "(no output file)"
    assert done.returncode == 0 and "DONE" in log, f"{done.stdout}{done.stderr}\n{log}"
    return log


def _said(log: str) -> dict:
    return {ln.split(" ", 1)[0]: ast.literal_eval(ln.split(" ", 1)[1]) for ln in log.splitlines()
            if ln[:1].isupper() and " " in ln and ln.split(" ", 1)[0].isupper()}


def test_a_world_across_two_nodes_keeps_state_between_cells(cluster, tmp_path):
    log = _run_job(cluster, tmp_path, "world", WORLD)
    said = _said(log)
    assert said["STATUS"] == [(0, "n1", True), (1, "n1", True), (2, "n2", True), (3, "n2", True)], said
    # cell 2 read cell 1's x on every rank, summed across both nodes: (1+2+3+4) * 10
    y3, where2, where1 = said["PULL"]
    assert y3 == 100.0, said["PULL"]
    assert where2[0] == "n2" and where1[0] == "n1", said["PULL"]
    assert where2[1] is not None, "rank 2 does not run under an srun step of n2"
    assert said["RUN"] == [(0, "n1"), (1, "n1"), (2, "n2"), (3, "n2")], said["RUN"]
    assert said["PUSHED"] == [6, 7, 8, 9]
    assert "[rank 2] made x on n2" in log and "[rank 3] made x on n2" in log, log
    message, rank, notes = said["RAISED"]
    assert message == "bad on rank 3" and rank == 3 and "on node 1" in notes, said["RAISED"]
    assert said["STILL"] == [100.0] * 4  # the namespaces outlived the failed cell
    assert said["CLOSED"] is True
    dead_rank, notes, seconds = said["DIED"]
    assert dead_rank == 3 and "on node 1" in notes and seconds < 5, said["DIED"]
    assert "closed" in said["REFUSED"]
    closed, seconds, why = said["BETWEEN"]
    assert closed and seconds < 3 and "rank 3" in why and "node 1" in why, said["BETWEEN"]
    assert "rank 3 died" in log.split("BETWEEN", 1)[0].rsplit("REFUSED", 1)[-1], log  # said on stderr
    assert said["AGAIN"] == [0, 1, 2, 3]
    rank, seconds, closed = said["STUCK"]
    assert rank == 1 and seconds < 15 and closed, said["STUCK"]
    time.sleep(1)  # the job's last step ends with it
    left = job_processes(cluster)
    assert not left, [(p.pid, p.name()) for p in left]
