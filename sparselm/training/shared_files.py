"""The files every rank must see alike: the run directory and the checkpoint a run resumes from.

Every rank writes its pieces of each checkpoint into ``train.out_dir``, and every rank reads its pieces of the
resume checkpoint, so both must be one directory on one file system that every node mounts.  On a node-local
path each node would see its own directory: a resume at step N on one node and a fresh start on another, then a
save that fails half-way.  ``agree_on_run_dir`` proves the sharing at start-up (a file rank 0 writes, every rank
looks for; Lightning's shared-file-system probe) and makes rank 0's resume choice everyone's.
"""
from __future__ import annotations

import secrets
from pathlib import Path

import torch.distributed as dist

from sparselm.errors import ConfigError
from sparselm.training.peers import Host

PROBE_PREFIX = ".sparselm-shared-"


def agree_on_run_dir(out_dir: Path, resume: Path | None, hosts: list[Host]) -> Path | None:
    """Collective.  Rank 0 writes a probe file into ``out_dir`` (which its run lock created) and sends its resume
    choice (``resume``, what ``find_resume`` gave it); every rank checks that it sees both.  Returns rank 0's choice.
    Raises ConfigError on every rank naming the first rank and host that cannot see the directory or the
    checkpoint, and the fix."""
    rank = dist.get_rank()
    probe = out_dir / f"{PROBE_PREFIX}{secrets.token_hex(8)}"
    message = [None, None]
    if rank == 0:
        probe.write_text("written by rank 0 to check that every rank sees this directory\n")
        message = [probe.name, str(resume) if resume is not None else None]
    dist.broadcast_object_list(message, src=0)
    name, choice = message
    seen = (out_dir / name).is_file(), choice is None or (Path(choice) / "meta.json").is_file()
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, seen)
    if rank == 0:
        probe.unlink(missing_ok=True)
    for r, (sees_dir, _) in enumerate(everyone):
        if not sees_dir:
            raise ConfigError(
                f"train.out_dir '{out_dir}' is not shared: rank {r} on {hosts[r].name} cannot see the file rank 0 wrote "
                f"there; every rank writes its pieces of each checkpoint into it, so put it on a file system every "
                f"node mounts, at the same path")
    for r, (_, sees_checkpoint) in enumerate(everyone):
        if not sees_checkpoint:
            raise ConfigError(
                f"rank {r} on {hosts[r].name} cannot see '{choice}', the checkpoint rank 0 resumes from; every rank "
                f"reads its pieces of it, so keep checkpoints on a file system every node mounts")
    return Path(choice) if choice is not None else None
