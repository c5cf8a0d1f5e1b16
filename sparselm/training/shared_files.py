"""The files every rank must see alike: the run directory, the checkpoint a run resumes from and the data.

Every rank writes its pieces of each checkpoint into ``train.out_dir``, and every rank reads its pieces of the
resume checkpoint, so both must be one directory on one file system that every node mounts.  On a node-local
path each node would see its own directory: a resume at step N on one node and a fresh start on another, then a
save that fails half-way.  ``agree_on_run_dir`` proves the sharing at start-up (a file rank 0 writes, every rank
looks for; Lightning's shared-file-system probe) and makes rank 0's resume choice everyone's.
"""
from __future__ import annotations

import secrets
import zlib
from pathlib import Path

import numpy as np

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


def data_fingerprint(train, valid_sets: dict) -> dict:
    """What two ranks reading the same data agree on: sample counts of the training data and of each validation
    set and, for a packed dataset, its token count and a CRC of its document lengths (cheap: no token is read)."""
    def one(data) -> tuple:
        lengths = getattr(data, "lengths", None)
        if lengths is None:
            return (len(data),)
        return len(data), int(np.sum(lengths)), zlib.crc32(np.ascontiguousarray(lengths, dtype=np.int64).tobytes())
    return {"train": one(train), **{f"valid {name}".strip(): one(v) for name, v in sorted(valid_sets.items())}}


def agree_on_data(fingerprint: dict, hosts: list[Host]) -> None:
    """Collective: raise ConfigError on every rank when some rank opened other data than rank 0 (a dataset file
    that differs between nodes), naming the rank, its host and what differs."""
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, fingerprint)
    for rank, theirs in enumerate(everyone):
        for part, value in theirs.items():
            if value != everyone[0].get(part):
                raise ConfigError(
                    f"rank {rank} on {hosts[rank].name} opened other {part} data than rank 0 on {hosts[0].name} "
                    f"(samples, tokens, document-length CRC: {value} vs {everyone[0].get(part)}); every node must read "
                    f"the same dataset files: put them on a shared file system or copy them identically")
