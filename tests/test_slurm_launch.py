"""ranch past one machine through Slurm (launcher="slurm"), on a real two-node cluster started on
this machine (tests/slurm_cluster.py: each node its own network namespace, address and hostname).
The caller runs as a batch job on the first node, as a notebook inside an allocation does; the
other node's ranks start as an srun step there. Results and gather across nodes, a DDP all_reduce
across nodes, a remote rank's error with its type, rank and node, and nothing left behind."""
from __future__ import annotations

import ast
import os
import time
import sys

DAEMONS = ("munged", "slurmctld", "slurmscriptd", "slurmd")


def job_processes(cluster) -> list:
    """What of the cluster's processes is not one of its daemons: what jobs left running."""
    return [p for p in cluster.processes() if p.name() not in DAEMONS]


SCRIPT = r'''
import os, socket, sys, time
import psutil
from mpify import ranch, torchddp_launch

def where(tag):
    names = [p.name() for p in psutil.Process().parents()]
    return {"rank": int(os.environ["RANK"]), "world": int(os.environ["WORLD_SIZE"]),
            "node": os.environ.get("SLURMD_NODENAME"), "host": socket.gethostname(),
            "under_step": "slurmstepd" in names, "secret": "MPIFY_SLURM_SECRET" in os.environ, "tag": tag}

def total():
    import torch, torch.distributed as dist
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    print("summed on", socket.gethostname(), flush=True)
    return t.item(), dist.get_world_size()

def boom():
    if os.environ["RANK"] == "3":
        raise ValueError("bad input on rank 3")
    time.sleep(60)

print("GATHER", ranch(2, where, "a", launcher="slurm", gather=True), flush=True)
print("RANK0", ranch(2, where, "b", nnodes=2, launcher="slurm"), flush=True)
print("DDP", torchddp_launch(2, total, launcher="slurm", gather=True), flush=True)
t0 = time.monotonic()
try:
    ranch(2, boom, launcher="slurm")
except ValueError as e:
    notes = " | ".join(getattr(e, "__notes__", []))
    print("RAISED", repr((str(e), e.mpify_rank, notes, round(time.monotonic() - t0, 1))), flush=True)
print("DONE", flush=True)
'''


def test_ranch_across_two_slurm_nodes(cluster, tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(SCRIPT)
    job = tmp_path / "job.sh"
    job.write_text(f"#!/bin/sh\nexec {sys.executable} -u {script}\n")
    out = tmp_path / "job.out"
    done = cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp_path), str(job)],
                       timeout=300, check=False)
    log = out.read_text() if out.exists() else "(no output file)"
    assert done.returncode == 0 and "DONE" in log, f"{done.stdout}{done.stderr}\n{log}"
    said = {ln.split(" ", 1)[0]: ln.split(" ", 1)[1] for ln in log.splitlines()
            if ln.split(" ", 1)[0] in ("GATHER", "RANK0", "DDP", "RAISED")}
    gathered = ast.literal_eval(said["GATHER"])
    assert [r["rank"] for r in gathered] == [0, 1, 2, 3] and {r["world"] for r in gathered} == {4}, gathered
    assert [r["node"] for r in gathered] == ["n1", "n1", "n2", "n2"], gathered
    # the other node's ranks run under that node's srun step; none holds the channel's secret
    assert all(r["under_step"] for r in gathered) and not any(r["secret"] for r in gathered), gathered
    if cluster.netns:
        assert [r["host"] for r in gathered] == ["n1", "n1", "n2", "n2"], gathered
    assert ast.literal_eval(said["RANK0"])["rank"] == 0
    assert ast.literal_eval(said["DDP"]) == [(10.0, 4)] * 4
    assert "[rank 2] summed on" in log and "[rank 3] summed on" in log, log  # the remote ranks' lines
    message, rank, notes, seconds = ast.literal_eval(said["RAISED"])
    assert message == "bad input on rank 3" and rank == 3 and "on node 1" in notes, said["RAISED"]
    assert seconds < 30, said["RAISED"]
    # nothing of the job left on either node
    time.sleep(1)  # the job's last step ends with it
    left = job_processes(cluster)
    assert not left, [(p.pid, p.name()) for p in left]


FAILURES = r'''
import os, signal, time
import psutil
from mpify import ranch, RankDiedError

def die():
    if os.environ["RANK"] == "3":
        time.sleep(2)  # the others are waiting by now
        print("DYING", time.time(), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)

def kill_node():
    if os.environ["RANK"] == "2":
        node = next(p for p in psutil.Process().parents() if "mpify.engine.slurm.node" in " ".join(p.cmdline()))
        time.sleep(2)
        # the time of the kill, said half a second ahead: the node process forwards this line,
        # and a kill right after the print lost it once
        print("DYING", time.time() + 0.5, flush=True)
        time.sleep(0.5)
        node.kill()
    time.sleep(60)

for fn in (die, kill_node):
    t0 = time.monotonic()
    try:
        ranch(2, fn, launcher="slurm")
    except RankDiedError as e:
        notes = " | ".join(getattr(e, "__notes__", []))
        print("DIED", repr((fn.__name__, e.rank, str(e), notes, time.time())), flush=True)
print("AGAIN", ranch(2, lambda: int(os.environ["RANK"]), launcher="slurm", gather=True), flush=True)
'''

KILLED_CALLER = r'''
import os, signal, threading, time
from mpify import ranch

def sleepy():
    print("SLEEPING", os.getpid(), flush=True)
    time.sleep(120)

def kill_me_once_every_rank_slept():
    # the job's output file (beside this script): killed once all 4 ranks said they sleep, or
    # after 60 s (a loaded machine may take a while to start the other node's process)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "killed.out")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and open(out).read().count("SLEEPING") < 4:
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGKILL)

threading.Thread(target=kill_me_once_every_rank_slept, daemon=True).start()
ranch(2, sleepy, launcher="slurm")
'''


def _job(cluster, tmp_path, name: str, text: str, then: str = "") -> tuple[str, object]:
    script = tmp_path / f"{name}.py"
    script.write_text(text)
    job = tmp_path / f"{name}.sh"
    job.write_text(f"#!/bin/sh\n{sys.executable} -u {script}\n{then}")
    out = tmp_path / f"{name}.out"
    return str(job), out


def test_remote_deaths_are_reported_with_rank_and_node(cluster, tmp_path):
    job, out = _job(cluster, tmp_path, "failures", FAILURES)
    done = cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp_path), job],
                       timeout=300, check=False)
    log = out.read_text() if out.exists() else "(no output file)"
    assert done.returncode == 0 and "AGAIN" in log, f"{done.stdout}{done.stderr}\n{log}"
    died = [ast.literal_eval(ln.split(" ", 1)[1]) for ln in log.splitlines() if ln.startswith("DIED ")]
    assert [d[0] for d in died] == ["die", "kill_node"], log
    # how long from the death (the dying rank's own clock line) to the caller's error
    dying = [float(ln.rsplit(" ", 1)[1]) for ln in log.splitlines() if " DYING " in ln]
    assert len(dying) == 2, log
    (_, rank, text, notes, end), (_, node_rank, node_text, node_notes, node_end) = died
    seconds, node_seconds = end - dying[0], node_end - dying[1]
    # a remote rank SIGKILLed: named, with its signal and its node, within 3 s
    assert rank == 3 and "SIGKILL" in text and "on node 1" in notes and seconds < 3, died[0]
    # the node process killed: its step ends, the node's ranks are reported, within 5 s
    assert node_rank == 2 and "node 1's step (ranks 2-3)" in node_notes and node_seconds < 5, died[1]
    assert ast.literal_eval(log.split("AGAIN ", 1)[1].splitlines()[0]) == [0, 1, 2, 3]
    time.sleep(1)
    left = job_processes(cluster)
    assert not left, [(p.pid, p.name()) for p in left]


def test_a_killed_caller_takes_the_other_nodes_ranks_along(cluster, tmp_path):
    """The caller SIGKILLed mid-launch while its job goes on (a kernel killed inside an allocation):
    the other node's ranks, node process and step end within 10 s."""
    job, out = _job(cluster, tmp_path, "killed", KILLED_CALLER, then="echo CALLER_GONE\nsleep 30\n")
    jobid = cluster.run(["sbatch", "--parsable", "-N", "2", "-o", str(out), "-D", str(tmp_path), job]).stdout.strip()
    try:
        deadline = time.monotonic() + 120
        while "CALLER_GONE" not in (out.read_text() if out.exists() else ""):
            assert time.monotonic() < deadline, out.read_text() if out.exists() else "(no output)"
            time.sleep(0.2)
        gone_at = time.monotonic()
        log = out.read_text()
        assert log.count("SLEEPING") == 4, log  # every rank had started, both nodes'
        while True:
            ours = [p for p in cluster.processes() if p.name() == "python" or "mpify" in " ".join(p.cmdline())]
            if not ours or time.monotonic() - gone_at > 10:
                break
            time.sleep(0.2)
        assert not ours, [(p.pid, p.cmdline()[:4]) for p in ours]
    finally:
        cluster.run(["scancel", jobid.split(";")[0]], check=False)


def test_mpify_run_inside_an_allocation(cluster, tmp_path):
    """`mpify run --slurm` in a batch job: the notebook's slice runs on both nodes (it travels as
    text: the other node imports it from a folder of its own), rank 0's value printed."""
    import nbformat

    from test_slurm_export import CELLS

    nbformat.write(nbformat.v4.new_notebook(cells=CELLS), str(tmp_path / "census.ipynb"))
    mpify = os.path.join(os.path.dirname(sys.executable), "mpify")
    job, out = _job(cluster, tmp_path, "run", "")
    bad = [nbformat.v4.new_code_cell("import os"),
           nbformat.v4.new_code_cell("def bad():\n    if os.environ['RANK'] == '3':\n        raise ValueError('rank 3 bad')")]
    nbformat.write(nbformat.v4.new_notebook(cells=bad), str(tmp_path / "bad.ipynb"))
    (tmp_path / "run.sh").write_text(f"#!/bin/sh\n{mpify} run census.ipynb --fn census -n 2 --ddp --slurm -- --scale 2\n"
                                     f"{mpify} run bad.ipynb --fn bad -n 2 --slurm\necho EXIT $?\n")
    done = cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp_path), job],
                       timeout=300, check=False)
    log = out.read_text() if out.exists() else "(no output file)"
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\n{log}"
    got = ast.literal_eval([ln for ln in log.splitlines() if ln.startswith("{")][-1])
    assert got["world_size"] == 4 and got["sum"] == 20.0, log
    assert [node for _, node, _ in got["ranks"]] == ["n1", "n1", "n2", "n2"], got
    # a rank of the other node raises: its traceback names the notebook's cell, as on one machine
    assert 'File "bad.ipynb", cell 2, line 3, in bad' in log and "ValueError: rank 3 bad" in log, log
    assert "mpify: on node 1" in log and "EXIT 1" in log, log


def test_mpify_run_from_outside_an_allocation(cluster, tmp_path):
    """From the login node: Slurm makes the allocation (salloc), the command runs on its first
    node, every rank's lines and rank 0's value come back here live."""
    import subprocess

    import nbformat

    from test_slurm_export import CELLS

    nbformat.write(nbformat.v4.new_notebook(cells=CELLS), str(tmp_path / "census.ipynb"))
    mpify = os.path.join(os.path.dirname(sys.executable), "mpify")
    done = subprocess.run([mpify, "run", "census.ipynb", "--fn", "census", "-n", "2", "--ddp", "--nnodes", "2",
                           "--slurm", "--slurm-arg=--time=5", "--", "--scale", "2"],
                          cwd=tmp_path, env=cluster.env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    got = ast.literal_eval(done.stdout.strip().splitlines()[-1])
    assert got["world_size"] == 4 and got["sum"] == 20.0, done.stdout
    assert [node for _, node, _ in got["ranks"]] == ["n1", "n1", "n2", "n2"], got
    assert not cluster.run(["squeue", "-h"]).stdout.strip()  # the allocation is given back


SLEEPY_CELLS = ["import os, time", "def sleepy():\n    print('started', flush=True)\n    time.sleep(120)"]


def test_ctrl_c_on_mpify_run_from_outside_cancels_the_job(cluster, tmp_path):
    import signal
    import subprocess

    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nbformat.write(new_notebook(cells=[new_code_cell(c) for c in SLEEPY_CELLS]), str(tmp_path / "sleepy.ipynb"))
    mpify = os.path.join(os.path.dirname(sys.executable), "mpify")
    proc = subprocess.Popen([mpify, "run", "sleepy.ipynb", "--fn", "sleepy", "-n", "2", "--nnodes", "2", "--slurm"],
                            cwd=tmp_path, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if sum("started" in ln for ln in seen) == 4:
                break
        assert sum("started" in ln for ln in seen) == 4, "".join(seen)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=60)[0]
        assert proc.returncode == 130, "".join(seen) + rest
        assert "cancelled" in rest, rest
        deadline = time.monotonic() + 15
        while cluster.run(["squeue", "-h"]).stdout.strip() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not cluster.run(["squeue", "-h"]).stdout.strip()
        left = job_processes(cluster)
        assert not left, [(p.pid, p.name()) for p in left]
        assert time.monotonic() - t0 < 20
    finally:
        if proc.poll() is None:
            proc.kill()


STUCK = r'''
import os, signal, threading, time
import psutil
from mpify import torchddp_launch

def stuck():
    import torch, torch.distributed as dist
    print("IN", flush=True)
    if dist.get_rank() == 3:
        time.sleep(600)  # the others wait for it in the all_reduce
    dist.all_reduce(torch.ones(1))

threading.Timer(15.0, lambda: os.kill(os.getpid(), signal.SIGINT)).start()
t0 = time.monotonic()
try:
    torchddp_launch(2, stuck, launcher="slurm")
except KeyboardInterrupt:
    print("INTERRUPTED", round(time.monotonic() - t0, 1), flush=True)
ranks = [p for p in psutil.Process().children(recursive=True) if "RANK" in p.environ()]  # forkservers aside
print("CHILDREN", len(ranks), flush=True)
'''


def test_ctrl_c_frees_ranks_stuck_in_a_collective_across_nodes(cluster, tmp_path):
    """Ctrl-C in the caller (SIGINT, as a kernel's interrupt) while ranks of both nodes wait in an
    all_reduce for a rank that never comes: KeyboardInterrupt, every rank on both nodes stopped."""
    job, out = _job(cluster, tmp_path, "stuck", STUCK)
    done = cluster.run(["sbatch", "--wait", "-N", "2", "-o", str(out), "-D", str(tmp_path), job],
                       timeout=300, check=False)
    log = out.read_text() if out.exists() else "(no output file)"
    assert done.returncode == 0 and "INTERRUPTED" in log, f"{done.stdout}{done.stderr}\n{log}"
    assert log.count("IN") >= 4, log
    seconds = float(log.split("INTERRUPTED ", 1)[1].split()[0])
    assert seconds < 15 + 10, log  # the interrupt came at 15 s
    assert "CHILDREN 0" in log, log
    time.sleep(1)
    left = job_processes(cluster)
    assert not left, [(p.pid, p.name()) for p in left]


SCANCELLED = r'''
import os, time
from mpify import ranch

def sleepy():
    print("SLEEPING", os.getpid(), flush=True)
    time.sleep(120)

ranch(2, sleepy, launcher="slurm")
'''


def test_scancel_of_the_job_during_a_launch_leaves_nothing(cluster, tmp_path):
    """`scancel JOB` from a shell while a launch runs on both nodes: every process of it, on
    both nodes, ends (Slurm ends the steps; the caller's ranks follow the caller)."""
    job, out = _job(cluster, tmp_path, "scancelled", SCANCELLED)
    jobid = cluster.run(["sbatch", "--parsable", "-N", "2", "-o", str(out), "-D", str(tmp_path), job]).stdout.strip()
    deadline = time.monotonic() + 120
    while (out.read_text() if out.exists() else "").count("SLEEPING") < 4:
        assert time.monotonic() < deadline, out.read_text() if out.exists() else "(no output)"
        time.sleep(0.2)
    t0 = time.monotonic()
    cluster.run(["scancel", jobid.split(";")[0]])
    while True:
        left = job_processes(cluster)
        if not left or time.monotonic() - t0 > 15:
            break
        time.sleep(0.2)
    assert not left, [(p.pid, p.name(), p.cmdline()[:3]) for p in left]
    seconds = time.monotonic() - t0
    assert seconds < 15, seconds
