"""Which routed assignments are computed, in what order, and how they reach the experts.

An assignment is one (token, choice) pair, numbered ``token * k + choice``.  The plan lists the kept
assignments grouped by expert; a dispatcher moves those rows to whoever holds the experts.  The local
dispatcher is the identity; ``sparselm.parallel.expert`` installs an all-to-all one for expert parallelism.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DispatchPlan:
    order: torch.Tensor
    """[M] kept assignment ids grouped by expert (ascending expert id)."""
    counts: torch.Tensor
    """[E] kept assignments per expert (int64)."""
    routed: torch.Tensor
    """[E] assignments per expert before capacity drops (int64)."""


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take: ceil(capacity_factor * tokens * k / E)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def plan_dispatch(experts: torch.Tensor, probs: torch.Tensor, num_experts: int, capacity: int | None = None) -> DispatchPlan:
    """Group assignments by expert; with a capacity keep, per expert, the ``capacity`` assignments of highest
    routing probability (ties: lower assignment id first) and drop the rest."""
    flat_e = experts.reshape(-1)
    routed = torch.bincount(flat_e, minlength=num_experts)
    if capacity is None or capacity >= flat_e.numel():
        order = torch.argsort(flat_e, stable=True)
        return DispatchPlan(order=order, counts=routed, routed=routed)
    by_prob = torch.argsort(probs.reshape(-1), descending=True, stable=True)
    order = by_prob[torch.argsort(flat_e[by_prob], stable=True)]  # by expert, then probability
    starts = torch.cumsum(routed, 0) - routed
    rank_in_expert = torch.arange(order.numel(), device=order.device) - starts.repeat_interleave(routed)
    kept = order[rank_in_expert < capacity]
    return DispatchPlan(order=kept, counts=routed.clamp(max=capacity), routed=routed)


class LocalDispatcher:
    """No communication: every expert is on this process."""

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor):
        """rows [M, D] grouped by expert, counts [E] -> (rows for local experts, local counts, context)."""
        return rows, counts, None

    def combine(self, rows: torch.Tensor, context) -> torch.Tensor:
        """Expert outputs back in the order ``dispatch`` received them."""
        return rows
