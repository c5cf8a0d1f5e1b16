#!/usr/bin/env bash
# Installs what tests/e2e/test_slurm.py needs to run a real one-node SLURM cluster on this machine:
# Debian's slurm-wlm (slurmctld, slurmd, sbatch, srun, scontrol) and munge, and what tools/local_cluster.py
# needs for the multi-node tests (tests/e2e/multinode): iproute2's `ip` (unshare and nsenter come with
# util-linux), openssh-server's sshd and pdsh for the deepspeed launcher's hostfile route. Needs root and a reachable
# package mirror; does nothing when the binaries are already there. The daemons are not started here:
# the tests start their own, with state under a temporary directory.
set -euo pipefail
need=(slurmctld slurmd sbatch munged ip sshd pdsh ssh-keygen)
missing=0
for b in "${need[@]}"; do command -v "$b" >/dev/null 2>&1 || [[ -x "/usr/sbin/$b" ]] || missing=1; done
if [[ $missing == 0 ]]; then
  echo "slurm, munge, iproute2, openssh and pdsh already installed"
  exit 0
fi
if [[ $(id -u) != 0 ]]; then
  echo "install_local_cluster.sh: slurm-wlm and munge are missing and this is not root;" \
       "install them (apt-get install slurm-wlm munge) or the SLURM tests will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
# --no-install-recommends: no mail server or docs; policy-rc.d-free containers do not start the services.
apt-get install -y -q --no-install-recommends slurm-wlm munge iproute2 openssh-server openssh-client pdsh
