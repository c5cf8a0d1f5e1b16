"""Where this rank's tensors sit inside the canonical tensors: boxes (offsets, sizes), for checkpoints.

A piece (``sparselm.parallel.pieces``) is cut from its canonical tensor by its placements; along each
dimension the piece is then a list of *segments*, runs of consecutive local indices that map to consecutive
canonical indices (one per dimension usually; ``blocks`` of a fused projection give several).  A region of
the piece maps to canonical boxes by splitting it at segment boundaries.  ZeRO partitions optimizer state and
fp32 master weights as flat ranges of each parameter: ``flat_range_boxes`` turns such a range into boxes (at
most 2 * ndim - 1 of them before the segment split), so a rank can write and read exactly the elements it owns
under layout-free coordinates (torch.distributed.checkpoint's chunk offsets).  Pure index arithmetic.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import torch

from sparselm.parallel.pieces import Shard, shard_rank_size


@dataclass(frozen=True)
class Segment:
    local: int
    """First local index of the run."""
    length: int
    canonical: int
    """The canonical index the run starts at."""


@dataclass(frozen=True)
class Box:
    """One rectangular region: where it is in the canonical tensor and in the local tensor."""
    offsets: tuple[int, ...]
    """Offsets in the canonical tensor."""
    sizes: tuple[int, ...]
    local: tuple[int, ...]
    """Offsets in the local tensor (the piece, or the flat range reshaped)."""


def _narrow(segs: list[Segment], start: int, length: int) -> list[Segment]:
    """The segments of local indices [start, start + length), re-based to start at 0."""
    out, end = [], start + length
    for s in segs:
        lo, hi = max(start, s.local), min(end, s.local + s.length)
        if lo < hi:
            out.append(Segment(lo - start, hi - lo, s.canonical + lo - s.local))
    return out


def _merge(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for s in segs:
        if out and out[-1].local + out[-1].length == s.local and out[-1].canonical + out[-1].length == s.canonical:
            out[-1] = Segment(out[-1].local, out[-1].length + s.length, out[-1].canonical)
        else:
            out.append(s)
    return out


def piece_layout(local_shape, shards: tuple[Shard, ...], groups: dict) -> tuple[tuple[int, ...], list[list[Segment]]]:
    """(canonical shape, segments per dimension) of this rank's piece of local shape ``local_shape`` cut by
    ``shards`` over ``groups`` ('tp'/'ep' -> process group)."""
    sizes = [shard_rank_size(s, groups) for s in shards]
    canonical = list(local_shape)
    for shard, (_, size) in zip(shards, sizes):
        canonical[shard.dim] *= size
    segs = [[Segment(0, n, 0)] for n in canonical]
    for shard, (rank, size) in zip(shards, sizes):
        width = sum(s.length for s in segs[shard.dim])
        block = width // shard.blocks
        chunk = block // size
        cut: list[Segment] = []
        for b in range(shard.blocks):
            for s in _narrow(segs[shard.dim], b * block + rank * chunk, chunk):
                cut.append(Segment(s.local + b * chunk, s.length, s.canonical))
        segs[shard.dim] = _merge(cut)
    return tuple(canonical), segs


def split_box(local_offsets, sizes, segs: list[list[Segment]]) -> list[Box]:
    """The canonical boxes of the local region [local_offsets, local_offsets + sizes)."""
    per_dim = [_narrow(segs[d], local_offsets[d], sizes[d]) for d in range(len(sizes))]
    return [Box(tuple(s.canonical for s in combo), tuple(s.length for s in combo),
                tuple(o + s.local for o, s in zip(local_offsets, combo)))
            for combo in product(*per_dim)]


def piece_boxes(local_shape, segs: list[list[Segment]]) -> list[Box]:
    """The whole piece as canonical boxes (one, unless a dimension holds several segments)."""
    return split_box((0,) * len(local_shape), tuple(local_shape), segs)


def _flat_regions(shape, start: int, stop: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """Row-major flat range [start, stop) of a tensor of ``shape`` as consecutive regions (offsets, sizes)."""
    if start >= stop:
        return []
    if not shape:
        return [((), ())]
    inner = math.prod(shape[1:])
    r0, o0 = divmod(start, inner)
    r1, o1 = divmod(stop, inner)
    if r0 == r1:
        return [((r0, *off), (1, *sz)) for off, sz in _flat_regions(shape[1:], o0, o1)]
    out = []
    if o0:
        out += [((r0, *off), (1, *sz)) for off, sz in _flat_regions(shape[1:], o0, inner)]
        r0 += 1
    if r1 > r0:
        out.append(((r0, *([0] * (len(shape) - 1))), (r1 - r0, *shape[1:])))
    if o1:
        out += [((r1, *off), (1, *sz)) for off, sz in _flat_regions(shape[1:], 0, o1)]
    return out


def flat_range_boxes(local_shape, segs: list[list[Segment]], start: int, numel: int, flat: torch.Tensor) -> list[tuple[Box, torch.Tensor]]:
    """The elements [start, start + numel) of the flattened piece, held by ``flat`` (a 1-D tensor of ``numel``
    elements), as (canonical box, view of ``flat`` shaped like the box) pairs."""
    out, pos = [], 0
    for offsets, sizes in _flat_regions(tuple(local_shape), start, start + numel):
        region = flat.narrow(0, pos, math.prod(sizes)).view(sizes)
        pos += region.numel()
        for box in split_box(offsets, sizes, segs):
            view = region
            for d, (lo, n) in enumerate(zip(box.local, box.sizes)):
                view = view.narrow(d, lo - offsets[d], n)
            out.append((box, view))
    return out


def piece_views(tensor: torch.Tensor, segs: list[list[Segment]]) -> list[tuple[Box, torch.Tensor]]:
    """The whole piece ``tensor`` as (canonical box, view) pairs."""
    out = []
    for box in piece_boxes(tuple(tensor.shape), segs):
        view = tensor
        for d, (lo, n) in enumerate(zip(box.local, box.sizes)):
            view = view.narrow(d, lo, n)
        out.append((box, view))
    return out
