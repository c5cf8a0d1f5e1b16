"""Device-agnostic autograd collectives over a process group (gloo on CPU, nccl on GPU).

megatron-core's ``_gather_along_*`` allocate their output on CUDA, so gathering (``gather_output=True``,
full logits, sequence-parallel style splits) uses these instead.  Both follow megatron's convention for
tensor-parallel regions: what comes after a gather (or before a split) is computed identically on every
rank of the group, so the backward of a gather keeps this rank's slice of the gradient and the backward
of a split gathers the slices.  Sizes along ``dim`` must be equal on every rank.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


class GroupReducer:
    """All-reduces a tensor over a process group (None: the whole world) and returns the result as a new
    tensor; ``op`` is "sum" or "max".  Layers that keep statistics across ranks hold one as ``stats_reducer``."""

    OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def __init__(self, group=None):
        self.group = group

    def __call__(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        # Contiguous whatever the input's strides: the collective adds raw memory, and two ranks may hold the
        # same tensor in different layouts (a gradient is often a transposed view).
        t = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(t, op=self.OPS[op], group=self.group)
        return t


def all_gather_cat(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Every rank's ``x`` concatenated along ``dim`` in rank order (no autograd)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def local_chunk(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim`` (no autograd)."""
    world = dist.get_world_size(group)
    if world == 1:
        return x
    if x.shape[dim] % world:
        raise ValueError(f"cannot split size {x.shape[dim]} of dim {dim} evenly over {world} ranks")
    return x.chunk(world, dim=dim)[dist.get_rank(group)].contiguous()


class _GatherAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return all_gather_cat(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return local_chunk(grad, ctx.dim, ctx.group), None, None


class _SplitAlongDim(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, group):
        ctx.dim, ctx.group = dim, group
        return local_chunk(x, dim, group)

    @staticmethod
    def backward(ctx, grad):
        return all_gather_cat(grad, ctx.dim, ctx.group), None, None


def gather_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` (rank order); backward keeps this rank's slice."""
    return _GatherAlongDim.apply(x, dim % x.dim(), group)


def split_along_dim(x: torch.Tensor, dim: int, group) -> torch.Tensor:
    """This rank's contiguous chunk of ``x`` along ``dim``; backward gathers the chunks."""
    return _SplitAlongDim.apply(x, dim % x.dim(), group)
