"""Layout-free ("canonical") tensors: full tensors named as in the one-process model.

A parallel layout changes where tensors live, never what they are:
- a tensor split into equal pieces along one dimension over a process group is a shard: tensor-parallel
  shards carry megatron-core's attributes (``tensor_model_parallel``, ``partition_dim``, set by
  sparselm.parallel.tensor); shards over another group carry ``tensor.shard = ShardSpec(dim, group)``
  (expert parallelism: experts split along dim 0 over "ep").  Piece i lives on rank i of the group;
- a pipeline stage holds some layers only, under names its module maps back (``canonical_name``).

``gather_full`` assembles canonical tensors on global rank 0 from any layout; ``local_piece`` cuts
this rank's piece out of a canonical tensor, so loading needs no communication at all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    """Dimension of the canonical tensor that is split."""
    group: str
    """Process group the pieces are spread over, in group-rank order: 'tp' or 'ep'."""


def shard_of(tensor) -> ShardSpec | None:
    if getattr(tensor, "tensor_model_parallel", False):
        return ShardSpec(tensor.partition_dim, "tp")
    return getattr(tensor, "shard", None)


def mark_shard(tensor, dim: int, group: str):
    tensor.shard = ShardSpec(dim, group)
    return tensor


def local_piece(full: torch.Tensor, spec: ShardSpec | None, groups: dict) -> torch.Tensor:
    if spec is None:
        return full
    group = groups[spec.group]
    count, index = dist.get_world_size(group), dist.get_rank(group)
    size = full.shape[spec.dim] // count
    return full.narrow(spec.dim, index * size, size)


def canonical_names(module) -> dict[str, str]:
    """Local parameter/buffer name -> canonical name (identity unless the module renames, e.g. a pipeline)."""
    names = [n for n, _ in module.named_parameters()] + list(module.state_dict().keys())
    rename = getattr(module, "canonical_name", None)
    return {n: rename(n) if rename else n for n in names}


def _all_gather_along(tensor: torch.Tensor, spec: ShardSpec, groups: dict) -> torch.Tensor:
    group = groups[spec.group]
    pieces = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
    dist.all_gather(pieces, tensor.contiguous(), group=group)
    return torch.cat(pieces, dim=spec.dim)


def gather_full(local: dict[str, torch.Tensor], specs: dict[str, ShardSpec | None], groups: dict,
                pp_group=None) -> dict[str, torch.Tensor] | None:
    """Collective over the whole world.  ``local``: canonical name -> this rank's tensor (its piece when
    ``specs`` names a shard).  Returns every canonical tensor on global rank 0, None elsewhere."""
    full = {}
    for name in sorted(local):  # the same order on every rank of a group
        spec = specs.get(name)
        full[name] = _all_gather_along(local[name], spec, groups) if spec is not None else local[name]
    if pp_group is None or dist.get_world_size(pp_group) == 1:
        return full if dist.get_rank() == 0 else None
    ranks = dist.get_process_group_ranks(pp_group)
    gathered = [None] * len(ranks) if dist.get_rank() == ranks[0] else None
    dist.gather_object(full, gathered, dst=ranks[0], group=pp_group)
    if dist.get_rank() != 0:
        return None
    merged = {}
    for part in gathered:
        merged.update(part)
    return merged
