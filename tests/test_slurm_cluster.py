"""The real Slurm cluster tests start on this machine (tests/slurm_cluster.py): two nodes that run
what srun and sbatch place on them, scancel that ends a job's processes, and a stop that leaves
none of them behind. Skips where Slurm is missing and cannot be installed (not root, no apt-get)."""
import os
import time

import psutil

from conftest import skip_without_slurm
from slurm_cluster import SlurmCluster


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.1)


def _srun_each_node(c: SlurmCluster):
    out = c.run(["srun", "-N2", "-n2", "sh", "-c",
                 'echo "$SLURMD_NODENAME $SLURM_PROCID $(hostname) $(readlink /proc/self/ns/net)"'],
                timeout=30).stdout
    return sorted(line.split() for line in out.splitlines())


def test_srun_runs_one_task_on_each_node(cluster):
    rows = _srun_each_node(cluster)
    assert [r[0] for r in rows] == ["n1", "n2"], rows
    assert sorted(r[1] for r in rows) == ["0", "1"], rows
    if cluster.netns:  # two machines: own hostnames, own networks, neither this one's
        assert [r[2] for r in rows] == ["n1", "n2"], rows
        nets = {r[3] for r in rows}
        assert len(nets) == 2 and os.readlink("/proc/self/ns/net") not in nets, rows


def test_sbatch_wait_with_a_step_on_the_other_node(cluster, tmp_path):
    script = tmp_path / "job.sh"
    out = tmp_path / "out.txt"
    script.write_text(
        "#!/bin/sh\n"
        'echo "batch $SLURMD_NODENAME $(cat /proc/$PPID/comm)"\n'
        "srun --overlap -N1 -n1 -w n2 sh -c "
        "'echo \"step $SLURMD_NODENAME $(cat /proc/$PPID/comm) $SLURM_STEP_ID\"'\n")
    r = cluster.run(["sbatch", "--wait", "-N2", "-D", str(tmp_path), "-o", str(out),
                     str(script)], timeout=60)
    assert r.stdout.startswith("Submitted batch job"), r.stdout
    lines = out.read_text().splitlines()
    assert lines[0] == "batch n1 slurmstepd", lines
    assert lines[1] == "step n2 slurmstepd 0", lines


def test_scancel_ends_the_jobs_processes(cluster, tmp_path):
    pids_file = tmp_path / "pids"
    script = tmp_path / "long.sh"
    # one child that SIGTERM ends, then the script and a second child ignore SIGTERM: KillWait's
    # SIGKILL must end those
    script.write_text(
        "#!/bin/bash\n"
        "sleep 300 & echo $! >> pids.tmp\n"
        "trap '' TERM\n"
        "sleep 300 & echo $! >> pids.tmp\n"
        "echo $$ >> pids.tmp\n"
        "mv pids.tmp pids\n"
        "wait\n")
    job = cluster.run(["sbatch", "--parsable", "-N1", "-w", "n2", "-D", str(tmp_path),
                       "-o", "/dev/null", str(script)]).stdout.strip().split(";")[0]
    _wait_for(pids_file.exists, 20, "the job's processes to start")
    pids = [int(x) for x in pids_file.read_text().split()]
    assert len(_alive(pids)) == 3
    assert set(pids) <= {p.pid for p in cluster.processes()}
    t0 = time.monotonic()
    cluster.run(["scancel", job])
    _wait_for(lambda: not _alive(pids), 20, f"scancel to end {pids}")
    assert time.monotonic() - t0 < 15
    _wait_for(lambda: not cluster.run(["squeue", "-h", "-j", job], check=False).stdout.strip(),
              20, "the job to leave the queue")


def _cluster_leaves_nothing(c: SlurmCluster, tmp_path):
    """Stops `c` with a batch job and a step still running; checks no process, namespace or
    file of it is left."""
    script = tmp_path / "busy.sh"
    script.write_text("#!/bin/sh\nsrun --overlap -N1 -n1 -w n2 sleep 300 &\nsleep 300\n")
    c.run(["sbatch", "-N2", "-D", str(tmp_path), "-o", "/dev/null", str(script)])
    # the batch script on n1 and the step's sleep on n2 (two slurmstepd's each side)
    _wait_for(lambda: len([p for p in c.processes() if p.name() == "sleep"]) >= 2, 20,
              "the job's sleeps")
    procs = c.processes()
    names = sorted(p.name() for p in procs)
    assert {"munged", "slurmctld", "slurmd", "slurmstepd", "sleep"} <= set(names), names
    pids = [p.pid for p in procs] + list(c.daemon_pids.values())
    namespaces = [f"/run/netns/{ns}" for ns in c._namespaces]
    root = c.root
    c.stop()  # what the fixture does
    assert not _alive(pids), [(p.pid, p.name()) for p in procs if p.pid in _alive(pids)]
    assert not c.processes()
    assert not root.exists()
    assert not [ns for ns in namespaces if os.path.exists(ns)]
    c.stop()  # again: a no-op


def test_loopback_cluster_when_asked(tmp_path):
    """netns=False, the fallback where namespaces cannot be made: every slurmd on 127.0.0.1."""
    skip_without_slurm()
    with SlurmCluster(nodes=2, netns=False) as c:
        assert not c.netns and set(c.addresses.values()) == {"127.0.0.1"}
        rows = _srun_each_node(c)
        assert [r[0] for r in rows] == ["n1", "n2"], rows
        _cluster_leaves_nothing(c, tmp_path)


def test_stop_leaves_no_process(cluster, tmp_path):
    """Last in the file: stops the module's cluster, as the fixture would, while jobs run."""
    _cluster_leaves_nothing(cluster, tmp_path)
