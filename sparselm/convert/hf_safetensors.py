"""``SafetensorsDir``: a Hugging Face model directory's tensors, by their Hugging Face names, as one more
``CanonicalTensors`` reader (the headers at open, each tensor's bytes when read).

Follows ``save_pretrained``'s layout: ``model.safetensors.index.json`` naming the shards, or ``*.safetensors``
files without one; ``pytorch_model.bin`` is refused (it would unpickle arbitrary objects).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from sparselm.checkpoint.tensors import CanonicalTensors
from sparselm.errors import ConversionError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
"""safetensors dtype code -> torch dtype, for the unquantized codes conversion reads."""


def read_header(file: Path) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, safetensors dtype code) of one file, from its header only; ConversionError for a
    missing, truncated or non-safetensors file."""
    if not file.is_file():
        raise ConversionError(f"shard '{file}' named by model.safetensors.index.json is missing")
    size = file.stat().st_size
    with open(file, "rb") as f:
        raw = f.read(8)
        n = struct.unpack("<Q", raw)[0] if len(raw) == 8 else -1
        header = f.read(n) if 0 < n <= size - 8 else b""
    try:
        meta = json.loads(header)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ConversionError(f"shard '{file}' is truncated or not a safetensors file (unreadable header)")
    meta.pop("__metadata__", None)
    end = max((v["data_offsets"][1] for v in meta.values()), default=0)
    if 8 + n + end > size:
        raise ConversionError(f"shard '{file}' is truncated: {size} bytes, its header describes {8 + n + end}")
    return {k: (v["shape"], v["dtype"]) for k, v in meta.items()}


class SafetensorsDir(CanonicalTensors):
    """The tensors of a Hugging Face model directory by Hugging Face name: ``shapes``, ``file_of`` (name -> file)
    and ``dtype_codes`` (name -> safetensors code, quantized ones too) from the headers; ``[name]`` maps one
    file at a time and reads one tensor.  ``dtype(name)`` raises KeyError for a code outside ``DTYPES``.
    Raises ConversionError for a directory without safetensors, or a missing or truncated shard."""

    def __init__(self, path: Path):
        self.path, self.aliases = Path(path), {}
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            files = [f.name for f in sorted(self.path.glob("*.safetensors"))]
            if not files:
                raise ConversionError(f"'{self.path}' has no .safetensors weights (pytorch_model.bin is not read: "
                                      "it would unpickle arbitrary objects); re-save it with save_pretrained()")
        self.file_of, self.shapes, self.dtype_codes = {}, {}, {}
        for name in files:
            for tensor, (shape, code) in read_header(self.path / name).items():
                self.file_of[tensor], self.shapes[tensor], self.dtype_codes[tensor] = name, tuple(shape), code
        self._open: dict[str, object] = {}

    def dtype(self, name: str) -> torch.dtype:
        return DTYPES[self.dtype_codes[self.stored(name)]]

    def __getitem__(self, name: str) -> torch.Tensor:
        file = self.file_of[self.stored(name)]
        if file not in self._open:
            self._open = {file: safe_open(str(self.path / file), framework="pt")}  # one file mapped at a time
        return self._open[file].get_tensor(self.stored(name))
