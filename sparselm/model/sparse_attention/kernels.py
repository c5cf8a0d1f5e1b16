"""Executing an attention pattern: compiled FlexAttention on CUDA, exact masked SDPA elsewhere.

All paths take q [B, H, T, E] and k, v [B, Hkv, S, E] / [B, Hkv, S, D] where keys T .. S - 1 are
persistent memory slots (see patterns.py; E = 2D when the memory has its own query, see append_memory),
and give identical results up to floating-point rounding.
"""
from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from sparselm.model.sinks import causal_with_sinks, rescale_by_lse, with_sink_key
from sparselm.model.sparse_attention.patterns import PatternSpec, dense_mask, full_mask_mod, materialize

FLEX_BLOCK = 128  # FlexAttention's tile; also the query block of the block-sparse CPU path


def sparse_attention(q, k, v, spec: PatternSpec, memory=None, backend: str = "auto", memory_query=None,
                     sinks=None, scale: float | None = None) -> torch.Tensor:
    """Attention of q over k, v (and the memory slots ``(mk, mv)``, each [Hkv, N, D]) under `spec`.

    `memory_query` ([B, H, T, D], default q) is what the memory keys are scored against: the query
    before rotary, so that a memory lookup does not depend on the query's position (the paper's
    position-free persistent vectors).  The memory still shares the context's softmax.  `sinks` ([H] or
    None): a learned logit per query head in every softmax (``sparselm.model.sinks``): on the flex path the
    output is rescaled by the log-sum-exp, elsewhere the sink is one more always-visible key after the memory.
    ``scale``: the softmax scale (default head width^-0.5; multi-head latent attention passes its own).
    """
    t, scale = q.shape[-2], q.shape[-1] ** -0.5 if scale is None else scale
    if memory is not None and memory[0].shape[-2] > 0:
        q, k, v = append_memory(q, k, v, memory, memory_query)
    gqa = q.shape[1] != k.shape[1]
    if spec.name == "causal" and k.shape[-2] == t:
        if sinks is not None:
            return causal_with_sinks(q, k, v, sinks, scale, gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa, scale=scale)
    if backend == "auto":
        backend = "flex" if q.is_cuda else "reference"
    if sinks is not None and backend == "flex":
        out, lse = flex_attention(q, k, v, spec, gqa, scale, return_lse=True)
        return rescale_by_lse(out, lse, sinks)
    if sinks is not None:  # key S: past the context, so the patterns' memory rule shows it to every query
        d = v.shape[-1]
        return masked_attention(*with_sink_key(q, k, v, sinks, scale), spec, backend, gqa, scale)[..., :d]
    return masked_attention(q, k, v, spec, backend, gqa, scale)


def masked_attention(q, k, v, spec: PatternSpec, backend: str, gqa: bool, scale: float) -> torch.Tensor:
    """q over k, v under ``spec`` (keys past q's length: memory, visible to all) on ``backend``: reference,
    block_sparse or flex."""
    if backend == "reference":
        mask = dense_mask(spec, q.shape[-2], k.shape[-2], q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)
    if backend == "block_sparse":
        return block_sparse_attention(q, k, v, spec, gqa, scale)
    if backend == "flex":
        return flex_attention(q, k, v, spec, gqa, scale)
    raise ValueError(f"unknown attention backend '{backend}'")


def append_memory(q, k, v, memory, memory_query=None):
    """Keys and values with the memory slots after the context.  With a separate `memory_query` the
    head dimension doubles so that one softmax scores context keys against q and memory keys against
    memory_query: q' = [q | mq], context k' = [k | 0], memory k' = [0 | mk] (callers keep the
    1/sqrt(D) scale of the original width)."""
    mk, mv = (m.to(k.dtype).expand(k.shape[0], -1, -1, -1) for m in memory)
    v = torch.cat([v, mv], dim=2)
    if memory_query is None:
        return q, torch.cat([k, mk], dim=2), v
    context_keys = torch.cat([k, torch.zeros_like(k)], dim=-1)
    memory_keys = torch.cat([torch.zeros_like(mk), mk], dim=-1)
    return torch.cat([q, memory_query], dim=-1), torch.cat([context_keys, memory_keys], dim=2), v


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


def flex_attention(q, k, v, spec: PatternSpec, gqa: bool, scale: float, return_lse: bool = False):
    """Compiled on CUDA; eager elsewhere (torch 2.13 runs eager FlexAttention on CPU forward-only).
    ``return_lse``: (output, log-sum-exp [B, H, T] of each query's scores, natural log)."""
    from torch.nn.attention.flex_attention import flex_attention as eager

    fn = _compiled_flex() if q.is_cuda else eager
    bm = block_mask(spec, q.shape[-2], k.shape[-2], q.device)
    return fn(q, k, v, block_mask=bm, enable_gqa=gqa, scale=scale, return_lse=return_lse)


@lru_cache(maxsize=8)
def block_plan(spec: PatternSpec, q_len: int, kv_len: int, device: torch.device, block: int = FLEX_BLOCK):
    """Keys each query block needs, padded to the same count: (indices [n_blocks * width], mask
    [n_blocks, 1, block, width]).  Padding keys point at key 0 and are masked off; padding query rows
    (past q_len) see key 0 only, so no softmax row is empty (their outputs are dropped).  The pattern is
    evaluated one query block at a time ([block, kv_len] at once, never [q_len, kv_len])."""
    mod = full_mask_mod(spec, q_len, kv_len, device)
    n_blocks = -(-q_len // block)

    def block_rows(i: int) -> torch.Tensor:
        """[block, kv_len padded to a multiple of block] visibility of query block i's rows."""
        start = i * block
        n = min(block, q_len - start)
        rows = F.pad(materialize(mod, n, kv_len, device, q_start=start), (0, -kv_len % block, 0, block - n))
        rows[n:, 0] = True
        return rows

    seen = torch.stack([block_rows(i).view(block, -1, block).any(dim=(0, 2)) for i in range(n_blocks)])  # [query block, key block]
    width = int(seen.sum(1).max()) * block
    idx = torch.zeros(n_blocks, width, dtype=torch.long, device=device)
    mask = torch.zeros(n_blocks, block, width, dtype=torch.bool, device=device)
    offsets = torch.arange(block, device=device)
    for i in range(n_blocks):
        keys = (seen[i].nonzero()[:, None] * block + offsets).flatten()
        keys = keys[keys < kv_len]
        idx[i, : len(keys)] = keys
        mask[i, :, : len(keys)] = block_rows(i)[:, keys]
    return idx.flatten(), mask.unsqueeze(1)


def block_sparse_attention(q, k, v, spec: PatternSpec, gqa: bool, scale: float) -> torch.Tensor:
    """Exact attention that computes only the key blocks each query block can see (sub-quadratic on
    CPU): one gather of those keys for all query blocks, then one batched SDPA over the blocks."""
    b, h, t, d = q.shape[0], q.shape[1], q.shape[2], v.shape[-1]
    idx, mask = block_plan(spec, t, k.shape[-2], q.device)
    n_blocks, block, width = mask.shape[0], mask.shape[2], mask.shape[3]
    qb = F.pad(q, (0, 0, 0, n_blocks * block - t)).view(b, h, n_blocks, block, q.shape[-1]).transpose(1, 2)
    kb, vb = (x.index_select(2, idx).view(b, x.shape[1], n_blocks, width, x.shape[-1]).transpose(1, 2) for x in (k, v))
    out = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=gqa, scale=scale)  # [B, blocks, H, block, D]
    return out.transpose(1, 2).reshape(b, h, n_blocks * block, d)[:, :, :t]
