"""Context parallelism (``parallel.cp``): the pieces, the loss, MoE statistics, and method ``ulysses``
(DeepSpeed-Ulysses, Jacobs et al. 2023); method ``allgather`` is in ``context_allgather``.

Each rank of a context-parallel group of ``cp`` ranks holds the same parameters and reads the same samples;
it keeps the contiguous piece ``r`` (of ``T / cp`` tokens; with ``allgather`` chunks r and 2 cp - 1 - r of
2 cp) of every sequence, cut from the inputs *and* the already shifted labels with the same index set.  Everything in a block is token-wise except attention, which
``apply_context_parallel(model, topo)`` wraps:

- attention: an all-to-all turns q, k, v [B, H, T/cp, D] (this rank's tokens of its H heads) into
  [B, H/cp, T, D] (every token of 1/cp of the heads); the attention core then runs unchanged on the whole
  sequence (rotary at positions 0..T-1, every pattern, backend and window, the persistent memory slots of those
  heads), and a second all-to-all turns the output back.  Key/value heads fewer than cp are replicated first
  (rank r uses kv head r // (cp / Hkv), the one its query heads use), so grouped-query attention keeps its
  grouping.  Heads per TP rank must divide by cp (``layout.check_context_parallel``).
- the loss: the summed token loss and the valid-label count are added over the group, so every rank returns the
  loss of the whole sequences (the global token-weighted mean), in training and evaluation alike.  The sum is a
  differentiable all-reduce, whose backward adds the upstream gradients of the group: each rank's parameter
  gradients are cp times its piece's share, and the average DeepSpeed takes over the data x context-parallel
  ranks (the mpu's data-parallel group, ``sparselm.parallel.mpu``) is the whole batch's gradient.
- MoE layers: the per-sequence expert counts of the balance loss are summed over the group
  (``MoELayer.sequence_reducer``), the balance and z losses of a piece are its 1/cp share, and the layer aux
  losses are added over the group with the token loss.  Per-forward metrics are the piece's figures with the
  whole sequence's counts, whose mean over the group (the trainer's average over dp x cp) is cp=1's figure.
- statistics kept across steps (MoE load counts, PKM slot usage) are reduced over the data x context ranks
  (``parallelize``).
- without labels the model returns the logits of the whole sequences, gathered along the sequence.

The classes are swapped in place for subclasses (as FSDP2's ``fully_shard`` does), so parameter names,
checkpoints and rules keyed by class (tensor parallelism, recomputation) are unchanged.  Call after tensor
parallelism and before recomputation wraps the blocks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sparselm.model.attention import Attention
from sparselm.model.moe.layer import MoELayer
from sparselm.model.transformer import LossOutput, SparseLM
from sparselm.parallel.comm import GroupReducer, gather_along_dim, local_chunk


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over dim 0 in equal chunks; its own adjoint, so backward is the same exchange."""

    @staticmethod
    def exchange(x, group):
        x = x.contiguous()  # the collective reads and writes raw memory: both in row-major order
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _AllToAll.exchange(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.exchange(grad, ctx.group), None


class _SumOverGroup(torch.autograd.Function):
    """All-reduce (sum) whose backward all-reduces the upstream gradients: each rank's input gets the sum of
    every rank's upstream gradient (``torch.distributed.nn.functional.all_reduce``'s rule, which torch 2.13
    deprecates)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out, group=ctx.group)
        return out, None


def sequence_to_heads(x: torch.Tensor, group, cp: int) -> torch.Tensor:
    """[B, H, T/cp, D] (this rank's tokens, all heads) -> [B, H/cp, T, D] (all tokens, this rank's heads)."""
    b, h, t, d = x.shape
    send = x.reshape(b, cp, h // cp, t, d).transpose(0, 1)  # [cp (destination: head group), B, H/cp, t, D]
    recv = _AllToAll.apply(send.contiguous(), group)  # [cp (source: token piece), B, H/cp, t, D]
    return recv.permute(1, 2, 0, 3, 4).reshape(b, h // cp, cp * t, d)


def heads_to_sequence(y: torch.Tensor, group, cp: int) -> torch.Tensor:
    """Inverse of ``sequence_to_heads``: [B, H/cp, T, D] -> [B, H, T/cp, D]."""
    b, hl, tt, d = y.shape
    send = y.reshape(b, hl, cp, tt // cp, d).permute(2, 0, 1, 3, 4)  # [cp (destination: token piece), B, H/cp, t, D]
    recv = _AllToAll.apply(send.contiguous(), group)  # [cp (source: head group), B, H/cp, t, D]
    return recv.transpose(0, 1).reshape(b, hl * cp, tt // cp, d)


class UlyssesAttention:
    """Mixin put in front of an ``Attention`` (sub)class: ``attend`` sees whole sequences for 1/cp of the heads.
    ``cp_group``, ``cp_size``, ``cp_rank`` are set by ``apply_context_parallel``."""

    cp_group = None
    cp_size = 1
    cp_rank = 0

    def _kv_for_ranks(self, x: torch.Tensor) -> torch.Tensor:
        """k or v with at least cp heads: kv heads fewer than cp are repeated cp / Hkv times each."""
        heads = x.shape[1]
        return x if heads % self.cp_size == 0 else x.repeat_interleave(self.cp_size // heads, dim=1)

    def attend(self, q, k, v) -> torch.Tensor:
        q, k, v = (sequence_to_heads(x, self.cp_group, self.cp_size)
                   for x in (q, self._kv_for_ranks(k), self._kv_for_ranks(v)))
        return heads_to_sequence(super().attend(q, k, v), self.cp_group, self.cp_size)

    def head_sinks(self):
        """The sink logits of this rank's query heads (whole on every rank, like the memory below)."""
        sinks = super().head_sinks()
        if sinks is None:
            return None
        heads = sinks.shape[0] // self.cp_size
        return sinks[self.cp_rank * heads:(self.cp_rank + 1) * heads]

    def memory(self):
        """The persistent memory of this rank's kv heads (the parameters stay whole on every rank; the other
        rows' gradients come from the other ranks)."""
        memory = super().memory()
        if memory is None:
            return None
        heads = memory[0].shape[0]
        if heads % self.cp_size == 0:
            rows = slice(self.cp_rank * heads // self.cp_size, (self.cp_rank + 1) * heads // self.cp_size)
        else:
            first = self.cp_rank // (self.cp_size // heads)
            rows = slice(first, first + 1)
        return tuple(m[rows] for m in memory)


def piece_positions(seq_len: int, cp: int, rank: int, zigzag: bool, device=None) -> torch.Tensor:
    """Token positions [seq_len / cp] (int64) rank ``rank`` of ``cp`` holds: the contiguous piece ``rank``, or
    with ``zigzag`` chunks ``rank`` and ``2 cp - 1 - rank`` of 2 cp (causal load balance: every rank then has
    as many early as late queries, as Megatron's ``get_batch_on_this_cp_rank``)."""
    if not zigzag:
        c = seq_len // cp
        return torch.arange(rank * c, (rank + 1) * c, device=device)
    c = seq_len // (2 * cp)
    late = 2 * cp - 1 - rank
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange(late * c, (late + 1) * c, device=device)])


def sequence_piece(x: torch.Tensor, group, size: int, rank: int, zigzag: bool) -> torch.Tensor:
    """[B, T] -> rank ``rank``'s [B, T / size] of ``group`` (``piece_positions``; no autograd needed: ids, labels)."""
    if not zigzag:
        return local_chunk(x, 1, group)
    return x.index_select(1, piece_positions(x.shape[1], size, rank, True, x.device))


class ContextParallelLM:
    """Mixin put in front of ``SparseLM``: cuts this rank's piece of the sequences, adds the loss over the group,
    gathers the logits.  Inputs and labels are the whole (already shifted) sequences, as at cp=1."""

    cp_group = None
    cp_size = 1
    cp_rank = 0
    cp_zigzag = False

    def sequence_piece(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T] -> this rank's [B, T / cp] (``piece_positions``)."""
        return sequence_piece(x, self.cp_group, self.cp_size, self.cp_rank, self.cp_zigzag)

    def whole_sequence(self, y: torch.Tensor) -> torch.Tensor:
        """Every rank's [B, T / cp, ...] -> [B, T, ...] in position order."""
        y = gather_along_dim(y, 1, self.cp_group)
        if not self.cp_zigzag:
            return y
        order = torch.cat([piece_positions(y.shape[1], self.cp_size, r, True, y.device) for r in range(self.cp_size)])
        return y.index_select(1, torch.argsort(order))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """input_ids, labels: [B, T] (every rank of the group the same) -> logits [B, T, vocab] without labels;
        a LossOutput of the whole sequences with labels (the same value on every rank of the group)."""
        h, aux = self.hidden(self.sequence_piece(input_ids))
        if labels is None:
            return self.whole_sequence(self.head(h))
        lm_loss, aux = context_losses(*self.head.loss_terms(h, self.sequence_piece(labels)), aux, self.cp_group)
        return LossOutput(loss=lm_loss + aux, lm_loss=lm_loss, aux_loss=aux)


def context_losses(total: torch.Tensor, count: torch.Tensor, aux: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """(token loss, aux loss) of the whole sequences from this piece's summed token loss, valid-label count and
    aux losses: sums over the context-parallel ``group`` (differentiable; the count without gradient)."""
    count = count.clone()
    dist.all_reduce(count, group=group)
    return _SumOverGroup.apply(total, group) / count, _SumOverGroup.apply(aux, group)


def swap_class(module: nn.Module, mixin: type) -> None:
    """Make ``module`` an instance of a subclass of its class with ``mixin`` first (its names unchanged)."""
    klass = type(module)
    if issubclass(klass, mixin):
        return
    module.__class__ = type(f"{mixin.__name__}{klass.__name__}", (mixin, klass), {})


def apply_context_parallel(model: nn.Module, topo) -> nn.Module:
    """Make ``model`` (a SparseLM, after tensor parallelism) run this rank's piece of each sequence under
    ``topo.cp`` > 1; returns it, changed in place.  A no-op at cp=1."""
    if topo.cp == 1:
        return model
    if not isinstance(model, SparseLM):
        raise TypeError(f"context parallelism applies to a SparseLM, got {type(model).__name__}")
    # delayed on purpose: context_allgather imports this module (piece_positions)
    from sparselm.parallel.context_allgather import AllGatherAttention, check_allgather_attention

    group, size, rank = topo.cp_group, topo.cp, topo.cp_rank
    method = model.config.parallel.cp_method
    swap_class(model, ContextParallelLM)
    model.cp_group, model.cp_size, model.cp_rank, model.cp_zigzag = group, size, rank, method == "allgather"
    reducer = GroupReducer(group)
    for module in model.modules():
        if isinstance(module, Attention):
            if method == "allgather":
                check_allgather_attention(module)
            swap_class(module, AllGatherAttention if method == "allgather" else UlyssesAttention)
            module.cp_group, module.cp_size, module.cp_rank = group, size, rank
        elif isinstance(module, MoELayer):
            module.sequence_reducer, module.sequence_parts = reducer, size
    return model
