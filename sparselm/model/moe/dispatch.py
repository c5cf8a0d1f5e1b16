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


DROP_POLICIES = ("position", "probability")


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert may take from a group of ``num_tokens`` tokens: ceil(capacity_factor * tokens * k / E)."""
    return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def plan_dispatch(experts: torch.Tensor, probs: torch.Tensor, num_experts: int, capacity: int | None = None,
                  sequences: int = 1, per_sequence: bool = False, policy: str = "position") -> DispatchPlan:
    """Group assignments by expert; with a capacity, keep at most ``capacity`` assignments per expert (per
    expert and sequence with ``per_sequence``) and drop the rest.

    experts, probs: [N, k] chosen experts and their probabilities; the N tokens are ``sequences`` sequences of
    equal length, sequence-major.  policy: which assignments an expert keeps when over capacity:
      'position' - earlier positions first (then sequence, then choice), as Switch and GShard dispatch in
                   token order: an assignment is never dropped because of a token at a later position, so
                   the layer stays causal;
      'probability' - the highest routing probability first (ties: earlier first).  A later token can push
                   an earlier one out, so the output at a position depends on the future: not causal.
    Raises ValueError for an unknown policy or N not divisible by ``sequences``."""
    if policy not in DROP_POLICIES:
        raise ValueError(f"unknown drop policy {policy!r}; use one of {DROP_POLICIES}")
    flat_e = experts.reshape(-1)
    routed = count_ids(flat_e, num_experts)
    groups = sequences if per_sequence else 1
    if capacity is None or capacity * groups >= flat_e.numel():
        order = torch.argsort(flat_e, stable=True)
        return DispatchPlan(order=order, counts=routed, routed=routed)
    (n, k), m = experts.shape, flat_e.numel()
    if n % sequences:
        raise ValueError(f"{n} tokens do not split into {sequences} sequences of equal length")
    ids = torch.arange(m, device=flat_e.device)
    if policy == "probability":
        priority = torch.argsort(probs.reshape(-1), descending=True, stable=True)
    else:  # assignment (sequence, position, choice) ranked by (position, sequence, choice)
        seq_len = n // sequences
        seq, pos, choice = ids // (seq_len * k), ids // k % seq_len, ids % k
        priority = torch.argsort((pos * sequences + seq) * k + choice)
    bucket = (ids // (m // groups)) * num_experts + flat_e  # (group, expert)
    order = priority[torch.argsort(bucket[priority], stable=True)]  # by bucket, then priority
    sizes = count_ids(bucket, groups * num_experts)
    rank_in_bucket = ids - (torch.cumsum(sizes, 0) - sizes).repeat_interleave(sizes, output_size=m)
    kept = order[rank_in_bucket < capacity]
    kept = kept[torch.argsort(flat_e[kept], stable=True)]
    return DispatchPlan(order=kept, counts=count_ids(flat_e[kept], num_experts), routed=routed)


def count_ids(ids: torch.Tensor, n: int) -> torch.Tensor:
    """[n] int64 occurrences of each id in 0..n-1 (``torch.bincount`` with minlength=n, which reads the
    largest id back to the host on CUDA: a synchronisation per call; integer adds are exact in any order)."""
    return torch.zeros(n, dtype=torch.int64, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def combine_choices(out: torch.Tensor, gates: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """y[t] = sum over choices c of gates[t, c] * (expert output of assignment t * k + c; zero if dropped).

    out: [M, D] expert outputs of the kept assignments, in ``order`` ([M] assignment ids); gates: [N, k]
    (fp32).  The gate multiply and the sum over the k choices run in fp32 into one [N, D] accumulator, one
    expert-output row per choice read in out's dtype (no fp32 [N * k, D] buffer); the result is in out's
    dtype.  Deterministic: each output sums its k terms in choice order, and the backward's index-add
    writes each expert-output row from one assignment only."""
    (n, k), m = gates.shape, order.numel()
    if m == 0:  # every assignment dropped (or none routed here): zeros, still connected to both inputs
        return out.new_zeros(n, out.shape[1]) + (out.sum() + gates.sum() * 0).to(out.dtype)
    row = torch.zeros(n * k, dtype=torch.long, device=out.device).index_copy(0, order, torch.arange(m, device=out.device))
    kept = torch.zeros(n * k, dtype=torch.bool, device=out.device).index_fill(0, order, True)
    gate = torch.where(kept, gates.reshape(-1).float(), 0.0).view(n, k, 1)  # a dropped choice reads row 0, weight 0
    row = row.view(n, k)
    y = torch.zeros(n, out.shape[1], dtype=torch.float32, device=out.device)
    for c in range(k):
        y.addcmul_(out.index_select(0, row[:, c]), gate[:, c])
    return y.to(out.dtype)


class LocalDispatcher:
    """No communication: every expert is on this process."""

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor):
        """rows [M, D] grouped by expert, counts [E] -> (rows for local experts, local counts, context)."""
        return rows, counts, None

    def combine(self, rows: torch.Tensor, context) -> torch.Tensor:
        """Expert outputs back in the order ``dispatch`` received them."""
        return rows
