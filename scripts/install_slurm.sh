#!/usr/bin/env bash
# Installs what tests/slurm_cluster.py needs to run a real Slurm cluster on this one machine:
# Debian's slurm-wlm (slurmctld, slurmd, srun, sbatch, ...) and munge (munged, its key tool).
# Idempotent: does nothing when the binaries are already there. Not root, or no apt-get: says so
# and exits 0 (the Slurm tests then skip). apt-get update runs only when the install cannot find
# the packages without it (no package lists, as in a fresh container, or stale ones).
set -euo pipefail

needed=(slurmctld slurmd slurmstepd srun sbatch squeue scancel sinfo scontrol munged)
missing() {
    local b
    for b in "${needed[@]}"; do
        PATH="$PATH:/usr/sbin:/sbin" command -v "$b" > /dev/null 2>&1 || return 0
    done
    return 1
}

if ! missing; then
    echo "install_slurm: slurm and munge already installed"
    exit 0
fi
if [ "${EUID:-$(id -u)}" -ne 0 ]; then
    echo "install_slurm: not root, cannot install slurm-wlm and munge; the Slurm tests will skip"
    exit 0
fi
if ! command -v apt-get > /dev/null 2>&1; then
    echo "install_slurm: no apt-get, cannot install slurm-wlm and munge; the Slurm tests will skip"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt_get() { apt-get -o DPkg::Lock::Timeout=120 "$@"; }  # wait for another apt/dpkg, not fail
start=$SECONDS
# The package lists may be empty (a fresh container) or stale; only then is `update` needed.
if ! apt_get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null 2>&1; then
    apt_get update -qq
    apt_get install -y -qq --no-install-recommends slurm-wlm munge > /dev/null
fi
# The packages' postinst may start the system's own munged/slurmd/slurmctld where an init system
# runs (not in a container): the tests never use them (their own munged socket, own slurm.conf).
echo "install_slurm: installed slurm-wlm and munge in $((SECONDS - start)) s"
