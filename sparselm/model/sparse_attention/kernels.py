"""Executing an attention pattern: compiled FlexAttention on CUDA, exact masked SDPA elsewhere.

All paths take q [B, H, T, D] and k, v [B, Hkv, S, D] where keys S - T.. S - 1 are persistent memory
slots (see patterns.py), and give identical results up to floating-point rounding.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from sparselm.model.sparse_attention.patterns import PatternSpec, dense_mask, full_mask_mod, materialize

FLEX_BLOCK = 128  # FlexAttention's tile; also the query block of the block-sparse CPU path


def sparse_attention(q, k, v, spec: PatternSpec, memory=None, backend: str = "auto") -> torch.Tensor:
    """Attention of q over k, v (and the memory slots ``(mk, mv)``, each [Hkv, N, D]) under `spec`."""
    t = q.shape[-2]
    if memory is not None and memory[0].shape[-2] > 0:
        k, v = (torch.cat([x, m.to(x.dtype).expand(x.shape[0], -1, -1, -1)], dim=2) for x, m in zip((k, v), memory))
    gqa = q.shape[1] != k.shape[1]
    if spec.name == "causal" and k.shape[-2] == t:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    if backend == "auto":
        backend = "flex" if q.is_cuda else "reference"
    if backend == "reference":
        mask = dense_mask(spec, t, k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    if backend == "block_sparse":
        return block_sparse_attention(q, k, v, spec, gqa)
    if backend == "flex":
        return flex_attention(q, k, v, spec, gqa)
    raise ValueError(f"unknown attention backend '{backend}'")


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


@lru_cache(maxsize=32)
def block_mask(spec: PatternSpec, q_len: int, kv_len: int, device: torch.device):
    """FlexAttention BlockMask, built once per (pattern, lengths, device)."""
    from torch.nn.attention.flex_attention import create_block_mask

    mod = full_mask_mod(spec, q_len, kv_len, device)
    return create_block_mask(mod, None, None, q_len, kv_len, device=device, BLOCK_SIZE=FLEX_BLOCK)


def flex_attention(q, k, v, spec: PatternSpec, gqa: bool) -> torch.Tensor:
    """Compiled on CUDA; eager elsewhere (torch 2.13 runs eager FlexAttention on CPU forward-only)."""
    from torch.nn.attention.flex_attention import flex_attention as eager

    fn = _compiled_flex() if q.is_cuda else eager
    bm = block_mask(spec, q.shape[-2], k.shape[-2], q.device)
    return fn(q, k, v, block_mask=bm, enable_gqa=gqa)


@lru_cache(maxsize=8)
def block_plan(spec: PatternSpec, q_len: int, kv_len: int, device: torch.device, block: int = FLEX_BLOCK):
    """Per query block: (start, end, key indices of every key block it can see, mask over those keys)."""
    mod = full_mask_mod(spec, q_len, kv_len, device)
    plan = []
    for start in range(0, q_len, block):
        end = min(start + block, q_len)
        rows = materialize(mod, end - start, kv_len, device, q_start=start)
        padded = F.pad(rows.any(0), (0, -kv_len % block))
        blocks = padded.view(-1, block).any(1).nonzero().flatten()
        idx = (blocks[:, None] * block + torch.arange(block, device=device)).flatten()
        idx = idx[idx < kv_len]
        plan.append((start, end, idx, rows[:, idx].contiguous()))
    return plan


def block_sparse_attention(q, k, v, spec: PatternSpec, gqa: bool) -> torch.Tensor:
    """Exact attention that computes only the key blocks each query block can see (sub-quadratic on CPU)."""
    outs = []
    for start, end, idx, mask in block_plan(spec, q.shape[-2], k.shape[-2], q.device):
        ks, vs = k.index_select(2, idx), v.index_select(2, idx)
        outs.append(F.scaled_dot_product_attention(q[:, :, start:end], ks, vs, attn_mask=mask, enable_gqa=gqa))
    return torch.cat(outs, dim=2)
