"""Attention patterns, each defined once as a FlexAttention ``mask_mod(b, h, q_idx, kv_idx) -> bool``.

The same functions run under FlexAttention (scalar index tensors, vmapped) and on broadcast index
grids to materialise dense boolean masks for the exact reference path, so the two paths cannot
disagree about which keys a query sees.  Every pattern is causal and keeps the diagonal, so no row
of a mask is empty.  Key positions >= seq_len are persistent memory slots, visible to every query.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from functools import lru_cache

import torch


@dataclass(frozen=True)
class PatternSpec:
    """The hashable part of the attention config that decides a mask (the cache key); the fields mean what
    AttentionConfig's fields of the same names mean (``name`` is its ``pattern``), defaults included."""

    name: str
    window: int
    stride: int
    summary: int
    block: int
    global_blocks: int
    window_blocks: int
    random_blocks: int
    seed: int

    @classmethod
    def from_config(cls, acfg) -> "PatternSpec":
        return cls(name=acfg.pattern, **{f.name: getattr(acfg, f.name) for f in fields(cls) if f.name != "name"})


def causal(b, h, q, kv):
    return kv <= q


def sliding_window(window: int):
    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q - kv < window)

    return mask_mod


def strided(stride: int):
    """Child et al. 2019 strided pattern: the union of a local band and every stride-th earlier key."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & ((q - kv < stride) | ((q - kv) % stride == 0))

    return mask_mod


def fixed(stride: int, summary: int):
    """Child et al. 2019 fixed pattern: own block, plus the last `summary` keys of every block."""

    def mask_mod(b, h, q, kv):
        return (kv <= q) & ((q // stride == kv // stride) | (kv % stride >= stride - summary))

    return mask_mod


def block_local(block: int):
    def mask_mod(b, h, q, kv):
        return (kv <= q) & (q // block == kv // block)

    return mask_mod


def random_block_table(spec: PatternSpec, n_blocks: int, device) -> torch.Tensor:
    """[n_blocks, n_blocks] bool: the random earlier blocks each query block sees (BigBird).

    Row i depends only on (seed, i), not on the sequence length, so a prefix of a longer sequence is
    attended exactly as the shorter sequence is (generation relies on it).  Candidates are the blocks
    not already covered by the global blocks or the window.
    """
    table = torch.zeros(n_blocks, n_blocks, dtype=torch.bool, device="cpu")  # drawn on the host, then moved
    gen = torch.Generator()
    for i in range(n_blocks):
        first, last = spec.global_blocks, i - spec.window_blocks  # candidates: first..last inclusive
        count = last - first + 1
        if count <= 0 or spec.random_blocks == 0:
            continue
        gen.manual_seed(spec.seed * 1_000_003 + i)
        picks = torch.randperm(count, generator=gen, device="cpu")[: spec.random_blocks] + first
        table[i, picks] = True
    return table.to(device)


def bigbird(spec: PatternSpec, seq_len: int, device):
    """Global + window + random blocks (Zaheer et al. 2020), causal."""
    n_blocks = -(-seq_len // spec.block)
    table = random_block_table(spec, n_blocks, device)
    block, n_global, n_window, last = spec.block, spec.global_blocks, spec.window_blocks, n_blocks - 1

    def mask_mod(b, h, q, kv):
        qb, kb = q // block, kv // block
        # Clamped: FlexAttention may evaluate padding positions past the table; the causal term masks them.
        rand = table[qb.clamp(max=last), kb.clamp(max=last)]
        return (kv <= q) & ((kb < n_global) | (qb - kb < n_window) | rand)

    return mask_mod


def pattern_mask_mod(spec: PatternSpec, seq_len: int, device):
    """The mask_mod of `spec` over context positions 0..seq_len-1."""
    if spec.name == "causal":
        return causal
    if spec.name == "sliding_window":
        return sliding_window(spec.window)
    if spec.name == "strided":
        return strided(spec.stride)
    if spec.name == "fixed":
        return fixed(spec.stride, spec.summary)
    if spec.name == "block_local":
        return block_local(spec.block)
    if spec.name == "bigbird":
        return bigbird(spec, seq_len, device)
    raise ValueError(f"unknown attention pattern '{spec.name}'")


def with_memory(mask_mod, seq_len: int):
    """Keys at positions >= seq_len are persistent memory: always visible."""

    def memory_mask_mod(b, h, q, kv):
        return (kv >= seq_len) | mask_mod(b, h, q, kv)

    return memory_mask_mod


def full_mask_mod(spec: PatternSpec, q_len: int, kv_len: int, device):
    """The mask_mod for q_len context queries over q_len context keys followed by kv_len - q_len memory slots."""
    mod = pattern_mask_mod(spec, q_len, device)
    return with_memory(mod, q_len) if kv_len > q_len else mod


def materialize(mask_mod, q_len: int, kv_len: int, device, q_start: int = 0) -> torch.Tensor:
    """Dense [q_len, kv_len] bool mask of rows q_start..q_start+q_len-1, evaluated on broadcast index grids."""
    q = torch.arange(q_start, q_start + q_len, device=device)[:, None]
    kv = torch.arange(kv_len, device=device)[None, :]
    zero = torch.zeros((), dtype=torch.long, device=device)
    return mask_mod(zero, zero, q, kv).expand(q_len, kv_len)


@lru_cache(maxsize=16)
def dense_mask(spec: PatternSpec, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    return materialize(full_mask_mod(spec, q_len, kv_len, device), q_len, kv_len, device).contiguous()
