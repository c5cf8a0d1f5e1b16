"""Gating noise that depends on where a token is, never on how the batch was split.

``keyed_normal(seed, step, positions, num_experts)`` gives one standard normal per (token, expert) from a
counter-based hash of (train.seed, optimizer step, the token's position in the step's global batch,
expert): no generator state, so one process, any data-parallel split and any micro-batch size draw the
same noise for the same token (the same idea as Philox / JAX's keyed random numbers, here as integer
arithmetic that every device runs identically).
"""
from __future__ import annotations

import math

import torch

_MASK = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): split c so no product overflows int64."""
    lo = (x * (c & 0xFFFF)) & _MASK
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _MASK


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash ("lowbias32", Wellons 2018) on int64 tensors holding values < 2**32."""
    x = x & _MASK
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _absorb(h: torch.Tensor, value) -> torch.Tensor:
    return _mix(h + _GOLDEN + (value & _MASK))


def _uniform(key: torch.Tensor) -> torch.Tensor:
    return (key.double() + 0.5) / 2.0**32  # in (0, 1): the logarithm below stays finite


def keyed_normal(seed: int, step: int, positions: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Standard normal noise [len(positions), num_experts] in fp32.

    seed: train.seed; step: optimizer steps taken before this one; positions: int64 [N], each token's index
    in the step's global batch (sequence-major: sample * seq_len + t).  Box-Muller from two hashed uniforms
    per (token, expert)."""
    device = positions.device
    head = torch.tensor(seed & _MASK, dtype=torch.int64, device=device)
    for word in ((seed >> 32) & _MASK, step & _MASK, (step >> 32) & _MASK):
        head = _absorb(head, word)
    pos = positions.to(torch.int64).unsqueeze(1)
    h = _absorb(_absorb(head, pos & _MASK), pos >> 32)
    lane = torch.arange(num_experts, device=device, dtype=torch.int64).unsqueeze(0) * 2
    u1, u2 = _uniform(_absorb(h, lane)), _uniform(_absorb(h, lane + 1))
    return (torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)).float()
