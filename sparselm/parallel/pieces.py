"""This rank's piece of a global tensor: the one description construction, parallelisation and
checkpoints share.

A parallel layout changes where a tensor lives, never what it is.  A parameter (or buffer) of a parallel
model is a *piece* of the canonical tensor of the one-process model with the same canonical name; its
``placements`` say how the piece is cut out of it, one ``Shard`` per process group it is split over, applied
in order (like DTensor's ``Shard(dim)`` placements, named by group):

- ``Shard(dim, "tp")``: split along ``dim`` over the tensor-parallel group (heads, hidden units, vocabulary
  rows, PKM value columns); megatron-core's attributes ``tensor_model_parallel``, ``partition_dim``,
  ``partition_stride`` are set as well, since DeepSpeed's gradient norm reads them;
- ``Shard(0, "ep")``: experts split over the expert-parallel group;
- ``blocks > 1``: the dimension holds that many equal blocks side by side (a fused [gate | up] projection)
  and each block is split alike, so the piece is [gate_r | up_r] (megatron's ``partition_stride``);
- ``Shard(0, "gather", fixed=(i, n))``: not a process group but a fixed cut, chunk i of n (under ZeRO-3 a
  rank's experts are held as n modules so they are gathered apart: ``sparselm.parallel.zero3``).

Piece r of a group of n ranks is the r-th of n equal contiguous chunks.  ``piece`` cuts it from the full
tensor (construction, loading: no communication), ``assemble`` gathers the full tensor from the pieces
(saving, tests).  ``shard_`` cuts a parameter in place, real or on the meta device: layers that share the
Parameter (tied embeddings, shared PKM tables) see the piece too, and a tensor is never cut twice over one
group.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sparselm.errors import ConfigError


@dataclass(frozen=True)
class Shard:
    dim: int
    """Dimension of the canonical tensor that is split."""
    group: str
    """Process group the pieces are spread over, in group-rank order: 'tp' or 'ep'."""
    blocks: int = 1
    """Equal blocks along ``dim`` that are each split (2 for a fused gate/up projection)."""
    fixed: tuple[int, int] | None = None
    """(index, count): a cut that is the same on every rank, chunk ``index`` of ``count``, instead of the
    rank's piece over ``group`` (which then only names it)."""


def placements(tensor) -> tuple[Shard, ...]:
    """How ``tensor`` was cut from its canonical tensor (empty: it is the whole canonical tensor)."""
    return getattr(tensor, "placements", ())


def is_sharded_over(tensor, group: str) -> bool:
    return any(s.group == group for s in placements(tensor))


@dataclass(frozen=True)
class VirtualGroup:
    """A process group on paper: rank ``me``'s view of the group of global ``ranks``.  The parallelisation
    rules take it wherever they take a live group, so a planner (``sparselm.plan``) can cut rank r's pieces on
    the meta device with no torch.distributed at all; it cannot communicate."""
    ranks: tuple[int, ...]
    me: int

    def rank(self) -> int:
        return self.ranks.index(self.me)

    def size(self) -> int:
        return len(self.ranks)


def group_rank_size(group) -> tuple[int, int]:
    """(rank in ``group``, its size); a process without torch.distributed is a group of one."""
    if isinstance(group, VirtualGroup):
        return group.rank(), group.size()
    if group is None and not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_rank_size(shard: Shard, groups: dict) -> tuple[int, int]:
    """(index of the piece, pieces) that ``shard`` cuts for this rank: its fixed cut, or the rank in its group."""
    return shard.fixed if shard.fixed is not None else group_rank_size(groups.get(shard.group))


def in_world(group) -> bool:
    """Whether ``group`` is part of a parallel world: torch.distributed is up, or ``group`` is virtual."""
    return isinstance(group, VirtualGroup) or dist.is_initialized()


def _narrow(full: torch.Tensor, shard: Shard, rank: int, size: int) -> torch.Tensor:
    width = full.shape[shard.dim]
    if width % (size * shard.blocks):
        raise ConfigError(f"a tensor of shape {tuple(full.shape)} cannot be split along dim {shard.dim} into "
                          f"{shard.blocks} block(s) over {size} '{shard.group}' ranks; choose parallel.{shard.group} "
                          f"dividing {width // shard.blocks}")
    if shard.blocks == 1:
        return full.narrow(shard.dim, rank * (width // size), width // size)
    chunk = width // shard.blocks // size
    return torch.cat([block.narrow(shard.dim, rank * chunk, chunk) for block in full.chunk(shard.blocks, shard.dim)],
                     shard.dim)


def piece(full: torch.Tensor, shards: tuple[Shard, ...], groups: dict) -> torch.Tensor:
    """This rank's piece of the canonical tensor ``full`` (a view where it can be).  ``groups``: group name
    -> process group ('tp', 'ep')."""
    for shard in shards:
        full = _narrow(full, shard, *shard_rank_size(shard, groups))
    return full


def _gather(local: torch.Tensor, shard: Shard, group) -> torch.Tensor:
    from sparselm.parallel.comm import all_gather_cat

    if shard.blocks == 1:
        return all_gather_cat(local, shard.dim, group)
    parts = all_gather_cat(local.unsqueeze(0), 0, group)  # [rank, ...]
    blocks = [p.chunk(shard.blocks, shard.dim) for p in parts]  # [rank][block]
    return torch.cat([blocks[r][b] for b in range(shard.blocks) for r in range(len(parts))], shard.dim)


def assemble(local: torch.Tensor, shards: tuple[Shard, ...], groups: dict) -> torch.Tensor:
    """Collective over each group in ``shards``: the canonical tensor from every rank's ``local`` piece."""
    for shard in reversed(shards):
        if shard.fixed is not None:
            raise ValueError(f"a piece cut by a fixed {shard} cannot be gathered over a process group; gather "
                             "the parameters of every chunk (sparselm.parallel.zero3) instead")
        local = _gather(local, shard, groups[shard.group])
    return local


def place(tensor, shard: Shard):
    """Record that ``tensor`` is a piece cut by ``shard`` (after its earlier placements); returns it."""
    tensor.placements = placements(tensor) + (shard,)
    if shard.group == "tp":
        from megatron.core.tensor_parallel import set_tensor_model_parallel_attributes

        set_tensor_model_parallel_attributes(tensor, is_parallel=True, dim=shard.dim, stride=shard.blocks)
    return tensor


def shard_(param: torch.nn.Parameter, shard: Shard, groups: dict) -> torch.nn.Parameter:
    """Keep only this rank's piece of ``param`` along ``shard``, in place (meta parameters stay meta: no
    memory is touched); returns ``param``.  A no-op for a group of one, or when ``param`` is already cut
    over that group (a tensor shared by two layers)."""
    rank, size = group_rank_size(groups.get(shard.group))
    if size == 1 or is_sharded_over(param, shard.group):
        return param
    with torch.no_grad():
        param.data = _narrow(param.data, shard, rank, size).clone()
    return place(param, shard)

