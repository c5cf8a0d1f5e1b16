"""Tensor parallelism for SparseAttention: heads split across the tensor-parallel group.

The projections are split like the base ``Attention`` (q/k/v column-parallel, o row-parallel: each
rank holds a contiguous block of heads); the attention core needs no communication, because every
head's pattern and memory are independent of the others.  What the base rule does not know about is
the persistent memory, [kv_heads, N, head_dim]: each rank keeps the kv heads its k/v projections
produce, i.e. the same contiguous block along dim 0.
"""
from __future__ import annotations

import torch.distributed as dist

from sparselm.model.sparse_attention import SparseAttention


def shard_persistent_memory(module: SparseAttention, tp_group) -> SparseAttention:
    """Keep this rank's kv heads of the memory keys and values, in place; mark them tensor-parallel."""
    size, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    if size == 1 or module.memory_k is None:
        return module
    for param in (module.memory_k, module.memory_v):
        heads = param.shape[0]
        if heads % size:
            raise ValueError(f"allattn tensor parallelism: {heads} kv heads are not divisible by tp={size}")
        local = heads // size
        param.data = param.data.narrow(0, rank * local, local).clone()
        # The attributes megatron-core's grad-norm and checkpoint code read for sharded parameters.
        param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 1
    return module
