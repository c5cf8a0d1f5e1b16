"""Context parallelism, method ``allgather`` (Megatron-Core's ``cp_comm_type=all_gather``; torch's FlexAttention
context parallelism): each rank keeps its queries and all-gathers the keys and values of the whole sequence.

Each rank holds chunks r and 2 cp - 1 - r of the 2 cp chunks of every sequence (``context.piece_positions``,
zigzag: causal work balanced over the ranks).  Rotary positions, the causal / sliding-window mask of
``Attention`` and every pattern of ``SparseAttention`` (the BigBird table from the whole sequence's blocks) are
evaluated at the queries' *global* positions against keys 0..T-1, and the persistent memory slots join the
same softmax once (``kernels.append_memory``), so the result is the cp=1 attention of those queries, exactly,
in one softmax (no log-sum-exp merge needed).  The key/value gather's backward adds every rank's gradient of the
gathered keys and values and keeps this rank's piece.  No head-count limit (unlike Ulysses); each rank holds
the whole sequence's keys and values of its TP heads for one layer at a time, and the masked core is the
reference (masked SDPA) path: O(T / cp x T) scores per rank.  A p2p ring with a log-sum-exp merge (keys and
values passed around the group, only the neighbours' blocks for windows) is the next step.

Attention classes other than ``Attention`` and ``SparseAttention`` are refused: this method reimplements the
core, so a subclass's own core (another project's variant) would be bypassed silently.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparselm.errors import ConfigError
from sparselm.model.attention import Attention
from sparselm.model.sparse_attention import SparseAttention
from sparselm.model.sparse_attention.kernels import append_memory
from sparselm.model.sparse_attention.patterns import full_mask_mod
from sparselm.parallel.comm import all_gather_cat
from sparselm.parallel.context import piece_positions


class _GatherPieces(torch.autograd.Function):
    """Every rank's [B, H, t, D] concatenated along dim 2 in rank order; backward sums the gradient over the
    group (every rank's queries used every piece) and returns this rank's slice."""

    @staticmethod
    def forward(ctx, x, group, rank):
        ctx.group, ctx.rank, ctx.t = group, rank, x.shape[2]
        return all_gather_cat(x, 2, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[:, :, ctx.rank * ctx.t:(ctx.rank + 1) * ctx.t], None, None


def check_allgather_attention(module) -> None:
    """ConfigError unless ``module`` is exactly an ``Attention`` or a ``SparseAttention``, without sinks."""
    if type(module) not in (Attention, SparseAttention):
        raise ConfigError(f"parallel.cp_method=allgather reimplements the attention core and does not know "
                          f"{type(module).__name__}; use parallel.cp_method=ulysses")
    if getattr(module, "sinks", None) is not None:
        raise ConfigError("parallel.cp_method=allgather does not add model.attention_sinks to its softmax; use "
                          "parallel.cp_method=ulysses (each rank keeps its heads' sinks)")


class AllGatherAttention:
    """Mixin put in front of ``Attention`` or ``SparseAttention``: this rank's queries over the whole sequence's
    keys and values.  ``cp_group``, ``cp_size``, ``cp_rank`` are set by ``context.apply_context_parallel``."""

    cp_group = None
    cp_size = 1
    cp_rank = 0

    def _gathered(self, x: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return _GatherPieces.apply(x, self.cp_group, self.cp_rank).index_select(2, inverse)

    def attend(self, q, k, v) -> torch.Tensor:
        """q [B, H, t, D], k, v [B, Hkv, t, D] of this rank's tokens (before rotary) -> [B, H, t, D]."""
        t, cp, device = q.shape[-2], self.cp_size, q.device
        seq = t * cp
        positions = piece_positions(seq, cp, self.cp_rank, True, device)
        order = torch.cat([piece_positions(seq, cp, r, True, device) for r in range(cp)])
        inverse = torch.argsort(order)  # gathered (rank order) -> position order
        q_rot = self.rotary(q, positions)
        keys, values = self._gathered(self.rotary(k, positions), inverse), self._gathered(v, inverse)
        rows, cols = positions[:, None], torch.arange(seq, device=device)[None, :]
        zero = torch.zeros((), dtype=torch.long, device=device)
        if isinstance(self, SparseAttention):
            memory = self.memory()
            slots = memory[0].shape[-2] if memory is not None else 0
            cols = torch.arange(seq + slots, device=device)[None, :]
            mask = full_mask_mod(self.spec, seq, seq + slots, device)(zero, zero, rows, cols)
            if slots:
                q_rot, keys, values = append_memory(q_rot, keys, values, memory, q)
        else:
            lag = rows - cols
            mask = (lag >= 0) & (lag < self.window) if self.window else lag >= 0
        gqa = q_rot.shape[1] != keys.shape[1]
        return F.scaled_dot_product_attention(q_rot, keys, values, attn_mask=mask.expand(t, cols.shape[-1]),
                                              enable_gqa=gqa, scale=q.shape[-1] ** -0.5)
