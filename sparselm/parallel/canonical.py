"""Layout-free ("canonical") tensors: full tensors named as in the one-process model.

A parallel layout changes where tensors live, never what they are: a parameter is a piece of a canonical
tensor (``sparselm.parallel.pieces``: its ``placements``), and a pipeline stage holds some layers only,
under names its module maps back (``canonical_name``).  ``gather_full`` assembles canonical tensors on
global rank 0 from any layout.
"""
from __future__ import annotations

import re

import torch
import torch.distributed as dist

from sparselm.parallel.pieces import Shard, assemble

_EXPERT_CHUNK = re.compile(r"\.chunks\.\d+\.(gate_up_proj|down_proj|gate_up_proj_bias|down_proj_bias)$")


def unchunked(name: str) -> str:
    """The canonical name of a routed-experts weight held in ZeRO-3 gather chunks
    (``...experts.chunks.3.gate_up_proj`` -> ``...experts.gate_up_proj``; ``sparselm.parallel.zero3``);
    other names unchanged.  The chunk's rows are recorded in its placements."""
    return _EXPERT_CHUNK.sub(r".\1", name)


def canonical_names(module) -> dict[str, str]:
    """Local parameter/buffer name -> canonical name (identity unless the module renames, e.g. a pipeline,
    or holds experts in ZeRO-3 gather chunks)."""
    names = [n for n, _ in module.named_parameters()] + list(module.state_dict().keys())
    rename = getattr(module, "canonical_name", None)
    return {n: unchunked(rename(n) if rename else n) for n in names}


def gather_full(local: dict[str, torch.Tensor], specs: dict[str, tuple[Shard, ...]], groups: dict,
                pp_group=None) -> dict[str, torch.Tensor] | None:
    """Collective over the whole world.  ``local``: canonical name -> this rank's tensor (its piece when
    ``specs`` names placements).  Returns every canonical tensor on global rank 0, None elsewhere."""
    full = {}
    for name in sorted(local):  # the same order on every rank of a group
        full[name] = assemble(local[name], specs.get(name, ()), groups)
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
