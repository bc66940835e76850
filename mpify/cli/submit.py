"""`mpify run ... --slurm` from outside an allocation: Slurm makes one, and the same command runs
inside it.

Why salloc + srun rather than sbatch: `salloc -N K srun -N1 -n1 mpify run ... --slurm` gets the
allocation, runs the caller as a step on its first node (node 0, rank 0 there) and carries that
step's stdout and stderr back here live, through srun's own I/O forwarding: no output file on a
shared filesystem to tail. Inside, the command finds SLURM_JOB_ID set and starts the other nodes'
steps itself (engine/slurm/agents.py). Its exit code is this command's.

Ctrl-C here: salloc runs in a process group of its own (a terminal's Ctrl-C reaches this process
alone), and the job, found by its unique name, is cancelled with scancel; Slurm then ends every
step on every node. The notebook is read where the caller's step runs: its path must be visible
on the allocation's first node (the payload for the other nodes travels over the channel).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import uuid

# How long salloc may take to end once its job is cancelled, before it is killed.
CANCEL_WAIT = 30.0


def inner_command(notebook: str, options: list[str], target_args: list[str]) -> list[str]:
    """The `mpify run` the caller's step runs: the same options, the notebook by absolute path."""
    cmd = [sys.executable, "-m", "mpify", "run", os.path.abspath(notebook), *options, "--slurm"]
    return cmd + (["--", *target_args] if target_args else [])


def submit(inner: list[str], nnodes: int, slurm_args: list[str], name_hint: str) -> int:
    """Run `inner` as the first node's step of a new allocation of `nnodes` nodes; its exit code
    (130 if interrupted here, after the job was cancelled)."""
    for tool in ("salloc", "srun", "scancel"):
        if shutil.which(tool) is None:
            print(f"mpify: error: --slurm needs Slurm's {tool} on PATH", file=sys.stderr)
            return 2
    name = f"mpify-{name_hint}-{uuid.uuid4().hex[:8]}"
    cmd = ["salloc", "-Q", "-N", str(nnodes), "--job-name", name, *slurm_args,
           "srun", "-Q", "-N1", "-n1", "--kill-on-bad-exit=1", *inner]
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, process_group=0)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        subprocess.run(["scancel", "--name", name, "--user", str(os.getuid())], capture_output=True, timeout=30)
        try:
            proc.wait(CANCEL_WAIT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        print(f"mpify: interrupted; Slurm job {name} cancelled", file=sys.stderr)
        return 130
