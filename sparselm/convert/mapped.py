"""``MappedTensors``: another reader's tensors under other names, each copied, merged from per-expert pieces
or split out of a stacked tensor when read.  import-hf reads a Hugging Face directory as sparselm's canonical
tensors through one; export-hf reads a sparselm checkpoint as a family's tensors through another.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from sparselm.checkpoint.tensors import CanonicalTensors
from sparselm.convert.experts import expert_slot, merge_experts, part_shape, stacked_shape
from sparselm.convert.gpt_oss_experts import TRANSFORMS as EXPERT_TRANSFORMS, Transform

TRANSFORMS: dict[str, Transform] = {
    **EXPERT_TRANSFORMS,
    # a [1, N] tensor read as [N] and back (ERNIE 4.5's selection bias, sparselm's router.expert_bias)
    "one_row_in": Transform(lambda s: tuple(s[1:]), lambda t: t.reshape(t.shape[1:])),
    "one_row_out": Transform(lambda s: (1, *s), lambda t: t.unsqueeze(0)),
}
"""Named conversions of ``Recipe(kind="transform")``: gpt-oss's expert layouts and MXFP4
(``gpt_oss_experts.TRANSFORMS``), and one-row reshapes."""


@dataclass(frozen=True)
class Piece:
    """One source tensor of a mapped tensor."""

    source: str
    """Its name in the source reader."""
    part: str | None = None
    """'gate', 'up' or 'down' (``experts.PARTS``) when it is, or fills, one expert's slot of a stacked tensor."""
    expert: int | None = None
    """That expert's index in the stacked tensor."""


@dataclass(frozen=True)
class Recipe:
    """How one mapped tensor is made from the source."""

    kind: Literal["copy", "merge", "split", "transform"]
    """copy: the one piece as is; merge: a stacked tensor from per-expert pieces (every slot once); split: the
    one piece's slot (``part`` of ``expert``) out of the stacked source tensor; transform: ``transform`` of the
    pieces (``TRANSFORMS``: gpt-oss's expert layouts and MXFP4, one-row reshapes)."""
    pieces: tuple[Piece, ...]
    """The source tensors, in the order they are read (the first gives shape and dtype)."""
    transform: str | None = None
    """kind 'transform': the name of the conversion in ``TRANSFORMS``."""

    def shape(self, source: CanonicalTensors) -> tuple[int, ...]:
        """The mapped tensor's shape, from the source's headers."""
        first = self.pieces[0]
        one = tuple(source.shapes[source.stored(first.source)])
        if self.kind == "copy":
            return one
        if self.kind == "transform":
            return tuple(TRANSFORMS[self.transform].shape(*(source.shapes[source.stored(p.source)] for p in self.pieces)))
        if self.kind == "split":
            return part_shape(first.part, one)
        return stacked_shape(first.part, one, 1 + max(p.expert for p in self.pieces))


class MappedTensors(CanonicalTensors):
    """The tensors ``recipes`` (name -> ``Recipe``) make of ``source`` (any ``CanonicalTensors``), read when
    asked.  Splitting keeps the last two stacked source tensors read (gate_up and down of the layer being
    written), so a layer's experts are read once; merging reads each piece once."""

    def __init__(self, source: CanonicalTensors, recipes: dict[str, Recipe], aliases: dict[str, str] | None = None):
        self.source, self.recipes, self.aliases = source, recipes, aliases or {}
        self.shapes = {name: recipe.shape(source) for name, recipe in recipes.items()}
        self._stacked: dict[str, torch.Tensor] = {}

    def dtype(self, name: str) -> torch.dtype:
        recipe = self.recipes[self.stored(name)]
        if recipe.kind == "transform":
            try:
                first = self.source.dtype(recipe.pieces[0].source)
            except KeyError:  # not a float dtype (MXFP4 blocks)
                first = None
            return TRANSFORMS[recipe.transform].dtype(first)
        return self.source.dtype(recipe.pieces[0].source)

    def __getitem__(self, name: str) -> torch.Tensor:
        name = self.stored(name)
        recipe = self.recipes[name]
        first = recipe.pieces[0]
        if recipe.kind == "copy":
            return self.source[first.source]
        if recipe.kind == "transform":
            return TRANSFORMS[recipe.transform].apply(*(self.source[p.source] for p in recipe.pieces))
        if recipe.kind == "merge":
            return merge_experts(self.shapes[name], self.dtype(name),
                                 ((p.part, p.expert, self.source[p.source]) for p in recipe.pieces))
        return expert_slot(self._read_stacked(first.source), first.part, first.expert)

    def _read_stacked(self, name: str) -> torch.Tensor:
        if name not in self._stacked:
            if len(self._stacked) >= 2:
                self._stacked.pop(next(iter(self._stacked)))
            self._stacked[name] = self.source[name]
        return self._stacked[name]
