"""safetensors files as the checkpoint room writes and reads them (model, optimizer, RNG and export shards)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file, save

from sparselm.checkpoint.integrity import Checksums, write_bytes
from sparselm.errors import CheckpointError


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> dict:
    """Serialise ``tensors`` (safetensors' ``save``) and write the bytes, hashing them on the way; the file gets
    the mode the process umask gives (safetensors' save_file creates 0600, so teammates could not read
    checkpoints or exports).  Returns the file's checksum entry (``integrity.HashingStream.entry``).  The
    serialised file is held in memory while it is written (as DCP does for its own files)."""
    entry = write_bytes(path, save(tensors, metadata=metadata), safetensors=True)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return entry


def read_tensors(path: Path, sums: Checksums | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on CPU; with ``sums`` (the checkpoint's checksums, ``path`` inside
    it) verified in the same read.  Raises CheckpointError naming a missing, damaged or changed file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, use an earlier one")
    try:
        if sums is not None:
            return load(sums.read(str(path.relative_to(sums.ckpt))))
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({err}); use an earlier checkpoint") from None
