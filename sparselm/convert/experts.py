"""One vocabulary for routed experts stored one tensor per expert (Hugging Face checkpoints) and sparselm's
stacked form, and the one merge / split between them.

sparselm stacks the experts of a layer in two tensors: ``experts.gate_up_proj`` [E, 2H, D] (expert ``e``'s
gate rows ``[e, :H]``, its up rows ``[e, H:]``) and ``experts.down_proj`` [E, D, H]; a Hugging Face
checkpoint holds each expert's ``gate`` [H, D], ``up`` [H, D] and ``down`` [D, H] apart (transformers 5's
``MixtralExperts`` and the others fuse the same way in memory).  ``PARTS`` names the three; ``STACKED`` says
which stacked tensor holds each; ``expert_slot`` is the view of one part of one expert inside it, written
into when merging and read when splitting.
"""
from __future__ import annotations

import torch

PARTS = ("gate", "up", "down")
STACKED = {"gate": "gate_up_proj", "up": "gate_up_proj", "down": "down_proj"}
"""Part -> the name (after ``layers.{i}.ffn.experts.``, and in transformers 5's ``mlp.experts.``) of the
stacked tensor holding it."""


def expert_slot(stacked: torch.Tensor, part: str, e: int) -> torch.Tensor:
    """The view of ``part`` of expert ``e`` in ``stacked`` ([E, 2H, D] for gate / up, [E, D, H] for down):
    [H, D], [H, D] or [D, H]."""
    if part == "down":
        return stacked[e]
    h = stacked.shape[1] // 2
    return stacked[e, :h] if part == "gate" else stacked[e, h:]


def stacked_shape(part: str, one: tuple[int, ...], experts: int) -> tuple[int, ...]:
    """Shape of the stacked tensor holding ``part`` of ``experts`` experts whose one part has shape ``one``."""
    return (experts, 2 * one[0], one[1]) if part in ("gate", "up") else (experts, *one)


def part_shape(part: str, stacked: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one expert's ``part`` in a stacked tensor of shape ``stacked``."""
    return tuple(stacked[1:]) if part == "down" else (stacked[1] // 2, stacked[2])


def merge_experts(shape: tuple[int, ...], dtype: torch.dtype, pieces) -> torch.Tensor:
    """A stacked tensor of ``shape`` filled from ``pieces``, an iterable of (part, expert, tensor) covering
    every slot (gate and up of every expert, or down of every expert); each piece is read when reached."""
    out = torch.empty(shape, dtype=dtype)
    for part, e, tensor in pieces:
        expert_slot(out, part, e).copy_(tensor)
    return out
