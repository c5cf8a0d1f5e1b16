"""Tensor-parallel rule for SparseAttention: heads split across the tensor-parallel group.

The projections are split by the base ``Attention`` rule (q/k/v column-parallel, o row-parallel: rank r
holds a contiguous block of query heads and the kv heads they use).  The attention core needs no
communication, since each head's pattern and memory are independent of the other heads.  The rule adds
the persistent memory, [kv_heads, N, head_dim]: each rank keeps the kv heads its k/v projections make,
the same contiguous block along dim 0.
"""
from __future__ import annotations

from sparselm.model.sparse_attention import SparseAttention
from sparselm.parallel.pieces import Shard, shard_
from sparselm.parallel.tensor import register_tp_rule, tp_attention, tp_groups


@register_tp_rule(SparseAttention)
def tp_sparse_attention(attn: SparseAttention, topo) -> SparseAttention:
    tp_attention(attn, topo)
    if attn.memory_k is not None:
        shard_(attn.memory_k, Shard(0, "tp"), tp_groups(topo))
        shard_(attn.memory_v, Shard(0, "tp"), tp_groups(topo))
    return attn
