"""Block-scaled FP8 checkpoints (DeepSeek-V3's release: ``quantization_config`` fp8 e4m3 with
``weight_block_size`` [128, 128]) read as dequantized tensors, one tensor at a time.

Each ``F8_E4M3`` weight ``W`` [out, in] has ``W_scale_inv`` [ceil(out / b0), ceil(in / b1)] (fp32): block (r, c)
of the weight times its scale is the value (DeepSeek-V3's ``weight_dequant``; shapes that are not multiples of
the block are covered by the last, partial blocks).  ``DequantizedFP8`` wraps a ``SafetensorsDir`` so the
importer sees the weights in ``dtype`` (bf16 by default) and no scale tensors: the streaming importer's memory
bound holds (one tensor in fp32 at a time beside the shard being written).
"""
from __future__ import annotations

import math

import torch

from sparselm.checkpoint.tensors import CanonicalTensors
from sparselm.convert.hf_safetensors import DTYPES, SafetensorsDir
from sparselm.errors import ConversionError

FP8_CODE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                      dtype: torch.dtype) -> torch.Tensor:
    """``weight`` [out, in] (fp8) times ``scale_inv`` [ceil(out/b0), ceil(in/b1)] broadcast over its blocks, in
    fp32, returned in ``dtype``."""
    rows, cols = weight.shape
    scale = scale_inv.float().repeat_interleave(block[0], 0)[:rows].repeat_interleave(block[1], 1)[:, :cols]
    return (weight.float() * scale).to(dtype)


class DequantizedFP8(CanonicalTensors):
    """``source``'s tensors with every fp8 weight dequantized by its ``*_scale_inv`` (blocks of ``block``) to
    ``dtype``; the scale tensors themselves are not listed.  Raises ConversionError, from the headers, for an
    fp8 tensor without its scale or a scale whose shape does not cover the weight in blocks of ``block``."""

    def __init__(self, source: SafetensorsDir, block: tuple[int, int], dtype: torch.dtype = torch.bfloat16):
        self.source, self.block, self.out_dtype, self.aliases = source, tuple(block), dtype, {}
        self.scale_of = {}
        for name, code in source.dtype_codes.items():
            if code != FP8_CODE:
                continue
            scale = name + SCALE_SUFFIX
            if scale not in source.shapes:
                raise ConversionError(f"fp8 tensor {name} has no {scale} (block scales); supported: fp8 e4m3 weights "
                                      "with weight_scale_inv as DeepSeek-V3 stores them")
            want = tuple(math.ceil(n / b) for n, b in zip(source.shapes[name], self.block))
            if len(source.shapes[name]) != 2 or tuple(source.shapes[scale]) != want:
                raise ConversionError(f"{scale} has shape {tuple(source.shapes[scale])}; {name} "
                                      f"{tuple(source.shapes[name])} in blocks of {self.block} needs {want}")
            self.scale_of[name] = scale
        scales = set(self.scale_of.values())
        self.shapes = {k: v for k, v in source.shapes.items() if k not in scales}
        self.file_of = {k: v for k, v in source.file_of.items() if k not in scales}
        self.dtype_codes = {k: ("BF16" if k in self.scale_of else c) for k, c in source.dtype_codes.items()
                            if k not in scales}

    def dtype(self, name: str) -> torch.dtype:
        name = self.stored(name)
        return self.out_dtype if name in self.scale_of else DTYPES[self.source.dtype_codes[name]]

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self.stored(name)
        if name not in self.scale_of:
            return self.source[name]
        return dequantize_blocks(self.source[name], self.source[self.scale_of[name]], self.block, self.out_dtype)
