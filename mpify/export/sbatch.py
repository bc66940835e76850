"""The exported script's Slurm wrapper: an `sbatch` script that runs it with torchrun on every
node of the job (`mpify export --slurm`).

Why a wrapper of its own rather than options in the script: Slurm places processes, torchrun
starts and supervises the ranks of a node, and the script stays what it is everywhere else. The
wrapper is the one recipe torch's docs and most clusters' pages give, spelled out so that the
person who exported it can read and change it:

- one Slurm task per node (`srun --ntasks-per-node=1`), each running torchrun for the node's ranks;
- torchrun's c10d rendezvous on the job's first node (`--rdzv-endpoint`), with the job id as the
  rendezvous id, and a port derived from the job id, so that two jobs sharing a node do not meet;
- ranks per node: NPROC_PER_NODE if set, else the GPUs Slurm gave the node (SLURM_GPUS_ON_NODE),
  else the count given at export (`-n`, default 1);
- the interpreter: PYTHON if set, else the one that exported it (the same environment path on
  every node, as for `mpify run --slurm`); the script: its absolute path at export time, so that
  `sbatch` may be called from anywhere (the nodes must see that path: a shared filesystem).

`sbatch --wait -N 2 train.sbatch [options]` runs it as it is; its options go to the script.
"""
from __future__ import annotations

import shlex

__all__ = ["render_sbatch", "sbatch_path"]


def sbatch_path(script_path: str) -> str:
    """Where the wrapper of `script_path` goes: beside it, `.sbatch` for `.py`."""
    return (script_path[:-3] if script_path.endswith(".py") else script_path) + ".sbatch"


def render_sbatch(script_path: str, target: str, notebook: str, python: str, nproc: int = 1) -> str:
    """The sbatch script text for the exported `script_path` (absolute), which runs `target`."""
    q = shlex.quote
    return f"""#!/bin/bash
# Runs {target} from {notebook} on every node of a Slurm job, with torchrun (written by mpify export).
#   sbatch --wait -N 2 {q(sbatch_path(script_path).rsplit('/', 1)[-1])} [options of the script]
# Ranks per node: NPROC_PER_NODE, else the node's GPUs (SLURM_GPUS_ON_NODE), else {nproc}.
# Interpreter: PYTHON, else the one that exported it. The script's path must exist on every node.
#SBATCH --job-name={q(target)}
#SBATCH --ntasks-per-node=1
set -euo pipefail

PYTHON="${{PYTHON:-{python}}}"
SCRIPT={q(script_path)}
NPROC="${{NPROC_PER_NODE:-${{SLURM_GPUS_ON_NODE:-{nproc}}}}}"
# The job's first node hosts the rendezvous, on a port of this job's own.
HEAD="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"
PORT="$((20000 + SLURM_JOB_ID % 20000))"

srun --ntasks-per-node=1 --kill-on-bad-exit=1 \\
    "$PYTHON" -m torch.distributed.run \\
    --nnodes "$SLURM_NNODES" --nproc-per-node "$NPROC" \\
    --rdzv-backend c10d --rdzv-endpoint "$HEAD:$PORT" --rdzv-id "$SLURM_JOB_ID" \\
    "$SCRIPT" "$@"
"""
