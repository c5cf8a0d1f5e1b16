"""Tensor parallelism for product-key memory: the value table sharded along its embedding dimension.

Every rank of the tensor-parallel group computes the same queries, scores, slots and weights (those
weights are small and replicated); each reads only its slice of value columns.  The partial results
are then combined so that forward and backward equal the unsharded layer:
- plain output (no projection): the column slices are all-gathered;
- Memory+ gate / output projection: the gate rows and output-projection columns are sharded like the
  values (column- then row-parallel), and the partial outputs are all-reduced.
The weights and the gate input enter the sharded part through ``copy_to_group`` (identity forward,
all-reduce backward): each rank's gradient w.r.t. them covers only its columns.

Collectives: megatron-core's copy-to / reduce-from tensor-parallel region (device-agnostic all-reduces)
and sparselm.parallel.comm's gather (megatron's allocates on CUDA).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region as copy_to_group,
    reduce_from_tensor_model_parallel_region as reduce_from_group,
)

from sparselm.model.pkm.memory import ProductKeyMemory
from sparselm.model.pkm.usage import SlotUsage
from sparselm.parallel.comm import GroupReducer, gather_along_dim
from sparselm.parallel.pieces import Shard, group_rank_size, in_world, shard_
from sparselm.parallel.tensor import register_tp_rule


class TensorParallelPKM(ProductKeyMemory):
    """A ProductKeyMemory whose value columns (and gate/output projections) are this rank's shard.
    Made by ``shard_pkm``; ``tp_group`` is set there."""

    tp_group = None

    def read(self, slots, weights):
        return super().read(slots, copy_to_group(weights, self.tp_group))

    def project(self, memory, x):
        if self.out_weight is None:
            return gather_along_dim(memory, -1, self.tp_group)
        if self.gate_weight is not None:
            memory = memory * F.silu(F.linear(copy_to_group(x, self.tp_group), self.gate_weight))
        return reduce_from_group(F.linear(memory, self.out_weight), self.tp_group)


def shard_pkm(module: ProductKeyMemory, tp_group) -> ProductKeyMemory:
    """Shard a built (and initialised) ProductKeyMemory across ``tp_group`` in place and return it.

    Shared value tables: call it for every layer; the shared Parameter is sliced once."""
    if group_rank_size(tp_group)[1] == 1:
        return module
    if module.values is None:
        raise ValueError("shard_pkm: bind shared value tables before sharding")
    groups = {"tp": tp_group}
    shard_(module.values, Shard(1, "tp"), groups)  # a shared table is cut once, through its first layer
    if module.gate_weight is not None:
        shard_(module.gate_weight, Shard(0, "tp"), groups)
    if module.out_weight is not None:
        shard_(module.out_weight, Shard(1, "tp"), groups)
    module.__class__ = TensorParallelPKM
    module.tp_group = tp_group
    return module


@register_tp_rule(ProductKeyMemory)
def tp_pkm(module, topo):
    """apply_tp's rule: shard in place over the topology's tensor-parallel group."""
    return shard_pkm(module, topo.tp_group)


def share_usage_statistics(model: torch.nn.Module, dp_group) -> None:
    """Merge every PKM layer's slot-usage statistics over the data-parallel group at each step end, so its
    metrics describe the global batch (tensor-parallel ranks read the same slots and need nothing)."""
    if not in_world(dp_group) or group_rank_size(dp_group)[1] == 1:
        return
    reducer = GroupReducer(dp_group)
    for module in model.modules():
        if isinstance(module, SlotUsage):
            module.stats_reducer = reducer
