"""safetensors files as the checkpoint room writes and reads them (model, optimizer, RNG and export shards)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load, load_file

from sparselm.checkpoint.integrity import Checksums, HashingStream
from sparselm.errors import CheckpointError


# safetensors' dtype names (its format specification), in the order of its Dtype enum (smallest element first),
# which its serializer sorts by; the tensors sparselm writes have these dtypes
_DTYPE_NAMES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
                torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.float16: "F16", torch.bfloat16: "BF16",
                torch.int32: "I32", torch.float32: "F32", torch.float64: "F64", torch.int64: "I64"}
_DTYPE_RANK = {dtype: rank for rank, dtype in enumerate(_DTYPE_NAMES)}


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict | None = None) -> tuple[bytes, list[str]]:
    """The safetensors header of ``tensors`` (8-byte little-endian length, then JSON padded with spaces to a
    multiple of 8) and the order their data follows it: larger dtypes first, then by name, as safetensors' own
    serializer orders them (every tensor's data stays aligned to its element size; the file's bytes equal
    ``save``'s).  Raises CheckpointError for a dtype the format has no name for."""
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_NAMES:
            raise CheckpointError(f"tensor '{name}' has dtype {t.dtype}, which sparselm does not write to safetensors; "
                                  "convert it to one of " + ", ".join(map(str, _DTYPE_NAMES)))
    order = sorted(tensors, key=lambda n: (-_DTYPE_RANK[tensors[n].dtype], n))
    entries, offset = {}, 0
    if metadata:
        entries["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in order:
        t = tensors[name]
        size = t.numel() * t.element_size()
        entries[name] = {"dtype": _DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                         "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(entries, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> dict:
    """Write ``tensors`` (contiguous, on CPU) as one safetensors file, hashing the bytes on the way; returns the
    file's checksum entry (``integrity.HashingStream.entry``).  Each tensor's bytes go to the file straight from
    its memory, so writing needs no memory beyond ``tensors`` (safetensors' ``save`` would build the whole file
    in a buffer first, and ``save_file`` gives no stream to hash).  The file gets the mode the process umask
    gives (``save_file`` creates 0600, so teammates could not read checkpoints or exports).  Raises
    CheckpointError for a tensor that is not contiguous or not on CPU."""
    for name, t in tensors.items():
        if t.device.type != "cpu" or not t.is_contiguous():
            where = "not contiguous" if t.device.type == "cpu" else f"on {t.device}"
            raise CheckpointError(f"tensor '{name}' is {where}; write_safetensors takes contiguous CPU tensors: "
                                  "pass t.contiguous().cpu()")
    header, order = safetensors_header(tensors, metadata)
    with open(path, "wb") as f:
        stream = HashingStream(f, safetensors=True)
        stream.write(header)
        for name in order:
            if tensors[name].numel():
                stream.write(tensors[name].detach().reshape(-1).view(torch.uint8).numpy())
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
    return stream.entry()


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
