"""gpt-oss's routed-expert tensors <-> sparselm's stacked ones, and MXFP4 dequantization, one tensor at a time.

transformers 5 (``GptOssExperts``) and the published checkpoints hold, per layer, ``mlp.experts.gate_up_proj``
[E, D, 2I] (input-major: the transpose of sparselm's [E, 2I, D]) whose last dimension interleaves gate and
up (``[..., ::2]`` gate, ``[..., 1::2]`` up), ``gate_up_proj_bias`` [E, 2I] interleaved the same way,
``down_proj`` [E, I, D] (sparselm: [E, D, I]) and ``down_proj_bias`` [E, D].  sparselm keeps the gate rows
then the up rows (``convert.experts``).

MXFP4 (OCP microscaling, as in transformers' ``integrations/mxfp4.py``): ``{name}_blocks`` uint8 [E, R, G, 16]
holds 32 FP4 (E2M1) values per group, the low nibble first; ``{name}_scales`` uint8 [E, R, G] one E8M0 exponent
per group (bias 127).  Dequantized, a row is ``lut[nibble] * 2**(scale - 127)`` over G * 32 columns and the
result [E, R, G * 32] is the transpose of transformers' weight: sparselm's row-major layout (gate_up: R = 2I
rows still interleaved; down: R = D).  Every FP4 value times a power of two is exact in bf16, so the result
equals transformers' dequantization bit for bit.

``TRANSFORMS`` names each conversion for ``mapped.Recipe(kind="transform")``: its output shape from the source
shapes, its output dtype from the first source's, and the function.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
"""E2M1 value of each 4-bit code (sign bit 3)."""
MXFP4_DTYPE = torch.bfloat16
"""What MXFP4 weights are dequantized to (the dtype gpt-oss's other tensors are published in)."""


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = MXFP4_DTYPE,
                     split_gate_up: bool = False) -> torch.Tensor:
    """blocks uint8 [E, R, G, 16], scales uint8 [E, R, G] -> [E, R, G * 32] of ``dtype``, one expert at a time
    (temporaries of one expert's size); ``split_gate_up``: rows de-interleaved (gate rows then up rows) as each
    expert is written.  Raises ValueError when the shapes do not pair up."""
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != 16:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not pair up "
                         "(blocks [..., G, 16], scales [..., G])")
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    *lead, groups, _ = blocks.shape
    out = torch.empty(*lead, groups * 32, dtype=dtype)
    for e in range(blocks.shape[0]):
        blk, exp = blocks[e].to(torch.uint8), scales[e].to(torch.int32) - 127
        values = torch.stack([lut[(blk & 0x0F).long()], lut[(blk >> 4).long()]], dim=-1)  # [R, G, 16, 2]
        rows = torch.ldexp(values.flatten(-3), exp.repeat_interleave(32, -1)).to(dtype)
        out[e] = deinterleave(rows, 0) if split_gate_up else rows
    return out


def deinterleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[.., 2I (gate, up, gate, up ...) ..] along ``dim`` -> [.., I gate then I up ..]."""
    n = t.shape[dim]
    return torch.cat([t.index_select(dim, torch.arange(0, n, 2)), t.index_select(dim, torch.arange(1, n, 2))], dim)


def per_expert(t: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple) -> torch.Tensor:
    """``fn`` of each expert's slice ``t[e]``, written into one [E, *shape] tensor (temporaries of one expert)."""
    out = torch.empty(t.shape[0], *shape, dtype=t.dtype)
    for e in range(t.shape[0]):
        out[e] = fn(t[e])
    return out


def interleave(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The inverse of ``deinterleave``: gate half then up half along ``dim`` -> gate, up, gate, up ..."""
    gate, up = t.chunk(2, dim)
    return torch.stack([gate, up], dim + 1).flatten(dim, dim + 1)


@dataclass(frozen=True)
class Transform:
    """One named conversion of source tensors into one tensor."""

    shape: Callable[..., tuple]
    """Source shapes -> the output shape."""
    apply: Callable[..., torch.Tensor]
    """Source tensors -> the output tensor."""
    dtype: Callable[[torch.dtype | None], torch.dtype] = lambda d: d
    """First source's dtype (None when it is not a float dtype) -> the output dtype."""


def _swap12(shape):
    return (shape[0], shape[2], shape[1])


TRANSFORMS: dict[str, Transform] = {
    # import (transformers -> sparselm)
    "gate_up_in": Transform(_swap12, lambda t: per_expert(t, lambda w: deinterleave(w.t(), 0), _swap12(t.shape)[1:])),
    "gate_up_bias_in": Transform(tuple, lambda t: deinterleave(t, 1)),
    "down_in": Transform(_swap12, lambda t: t.transpose(1, 2).contiguous()),
    "gate_up_mxfp4_in": Transform(lambda b, s: (b[0], b[1], b[2] * 32),
                                  lambda b, s: dequantize_mxfp4(b, s, split_gate_up=True), lambda d: MXFP4_DTYPE),
    "down_mxfp4_in": Transform(lambda b, s: (b[0], b[1], b[2] * 32), dequantize_mxfp4, lambda d: MXFP4_DTYPE),
    # export (sparselm -> transformers)
    "gate_up_out": Transform(_swap12, lambda t: per_expert(t, lambda w: interleave(w, 0).t(), _swap12(t.shape)[1:])),
    "gate_up_bias_out": Transform(tuple, lambda t: interleave(t, 1)),
    "down_out": Transform(_swap12, lambda t: t.transpose(1, 2).contiguous()),
}
