"""safetensors files as the checkpoint room writes and reads them (model, optimizer, RNG and export shards)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparselm.errors import CheckpointError


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, then the file mode the process umask gives (save_file creates 0600, so
    teammates could not read checkpoints or exports)."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one safetensors file, on CPU.  Raises CheckpointError naming a missing or damaged file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, use an earlier one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({err}); use an earlier checkpoint") from None
