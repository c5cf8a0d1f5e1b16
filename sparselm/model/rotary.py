"""Rotary position embedding (Su et al. 2021), half-split ("rotate_half") form as in Llama, or interleaved pairs.

Frequencies are computed as transformers 5 computes them (``modeling_rope_utils``), in fp32, including its
long-context scalings: ``linear`` (positions / factor), ``llama3`` (Llama 3.1: low frequencies / factor, a
smooth ramp between) and ``yarn`` (per-dimension ramp plus an attention factor on cos and sin).  With
``fraction`` < 1 only the first ``fraction * head_dim`` channels of a head rotate (partial rotary).
"""
from __future__ import annotations

import math

import torch
from torch import nn


def rope_frequencies(mcfg, dim: int = 0) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rot_dim / 2] fp32, attention factor on cos/sin) of model config ``mcfg``, for
    ``dim`` rotated channels (0: ``head_width * rotary_fraction``; multi-head latent attention passes its
    ``qk_rope_head_dim``)."""
    dim = dim or int(mcfg.head_width * mcfg.rotary_fraction)
    base, kind, factor = mcfg.rope.theta, mcfg.rope.scaling, mcfg.rope.factor
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if kind in ("none", "default"):
        return inv_freq, 1.0
    if kind == "linear":
        return inv_freq / factor, 1.0
    old = mcfg.rope.original_max_seq_len
    if kind == "llama3":
        low, high = mcfg.rope.low_freq_factor, mcfg.rope.high_freq_factor
        low_wavelen, high_wavelen = old / low, old / high
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        attention = mcfg.rope.attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

        def correction_dim(rotations):
            return (dim * math.log(old / (rotations * 2 * math.pi))) / (2 * math.log(base))

        low, high = correction_dim(mcfg.rope.beta_fast), correction_dim(mcfg.rope.beta_slow)
        if mcfg.rope.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
        pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
        extrapolation = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
        return inv, float(attention)
    raise ValueError(f"model.rope.scaling={kind!r} is not one of none, linear, llama3, yarn")


def latent_softmax_scale(mcfg, qk_head_dim: int) -> float:
    """Softmax scale of multi-head latent attention: qk_head_dim^-0.5, times mscale(factor, mscale_all_dim)^2
    when a rope scaling is on and model.rope.mscale_all_dim is set (transformers' ``yarn_apply_mscale``,
    DeepSeek-V2/V3: mscale = 0.1 * mscale_all_dim * ln(factor) + 1 for factor > 1, else 1)."""
    scale, rope = qk_head_dim ** -0.5, mcfg.rope
    if rope.scaling != "none" and rope.mscale_all_dim:
        mscale = 1.0 if rope.factor <= 1 else 0.1 * rope.mscale_all_dim * math.log(rope.factor) + 1.0
        scale = scale * mscale * mscale
    return scale


class Rotary(nn.Module):
    """Applies rotary positions to [B, H, T, head_dim] queries or keys; ``dim`` rotated channels (0: the model's
    head_width * rotary_fraction).  With model.rope_interleave the rotated channels are read as interleaved
    pairs and written de-interleaved (evens then odds, as transformers' DeepSeek-V3 does): queries and keys
    get the same channel order, so their dot products are those of the interleaved rotation.

    Holds only the inverse frequencies (fp32, [rot_dim / 2]); the cos/sin table of the positions a call needs
    is computed in that call, in fp32 as transformers computes it, then cast to the input's dtype.  A
    per-layer table sized to ``model.max_seq_len`` would cost 2 x 4 x max_seq_len x rot_dim bytes per layer
    (about 2 GB at 128k tokens x 16 layers of width 128); the per-call table is [T, rot_dim], freed after the
    call, and equals the rows the full table had bit for bit (the same fp32 operations per element).
    """

    def __init__(self, mcfg, dim: int = 0):
        super().__init__()
        self.interleave = mcfg.rope_interleave
        inv_freq, scale = rope_frequencies(mcfg, dim)
        self.rot_dim, self.scale = 2 * inv_freq.numel(), scale
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def _apply(self, fn, recurse=True):
        # Keep the fp32 frequencies when the model is cast to bf16/fp16 (angles at long positions need every
        # bit); only the device follows ``fn``.
        kept = self.inv_freq
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            self.inv_freq = kept.to(self.inv_freq.device)
        return self

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [len(positions), rot_dim] in ``dtype``, for int64 token ``positions``."""
        angles = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat([angles, angles], dim=-1)
        return (emb.cos() * self.scale).to(dtype), (emb.sin() * self.scale).to(dtype)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, H, T, head_dim] -> same shape with rotary applied to the first rot_dim channels, at
        ``positions`` ([T] int64, default 0..T-1)."""
        if positions is None:
            positions = torch.arange(x.shape[-2], dtype=torch.int64, device=x.device)
        cos, sin = self.table(positions, x.dtype)
        if self.rot_dim < x.shape[-1]:
            rot, rest = x[..., :self.rot_dim], x[..., self.rot_dim:]
            return torch.cat([self._rotate(rot, cos, sin), rest], dim=-1)
        return self._rotate(x, cos, sin)

    def _rotate(self, x, cos, sin):
        if self.interleave:
            x = torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)
        x1, x2 = x.chunk(2, dim=-1)
        return x * cos + torch.cat([-x2, x1], dim=-1) * sin
