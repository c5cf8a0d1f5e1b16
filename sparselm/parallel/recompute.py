"""Activation recomputation (activation checkpointing) of transformer blocks, in every layout.

``apply_recompute(model, cfg)`` makes every ``parallel.recompute_every``-th block (blocks every-1,
2*every-1, ...) recompute in backward what it did not keep in forward, with torch's non-reentrant
``torch.utils.checkpoint`` (as torchtitan; the multi-token-prediction depths' blocks are numbered after
the decoder layers and chosen alike; it works under tensor, expert and data parallelism, ZeRO 0-3 and
DeepSpeed's pipeline stages alike, since it acts inside a block's forward):
- ``full``: a block keeps only its input; backward runs its whole forward again (Megatron's
  ``--recompute-granularity full``, torchtitan's full AC).
- ``selective``: a block keeps the outputs of its weight matmuls (``aten.mm``, ``aten.addmm``,
  ``aten._grouped_mm``) and recomputes the rest: attention core, rotary, norms, activations, routing and
  MoE dispatch buffers (torchtitan's per-op selective AC; Megatron's selective recomputes the attention core).
The blocks keep their class's parameters and names (the class is swapped for a subclass), so checkpoints
and canonical names do not change.  A recomputed forward computes the same numbers (RNG state is replayed
by torch, a layer's forward state by ``hooks.ForwardState``) and counts no statistics twice
(``sparselm.model.recompute``).  Call it before the engine is built; ``torch.compile`` of a block must wrap
the recomputed block from outside.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from sparselm.model.hooks import ForwardState
from sparselm.model.recompute import recomputation, recomputed_layers
from sparselm.model.transformer import Block

_aten = torch.ops.aten
SAVED_OPS = {_aten.mm.default, _aten.addmm.default}
"""Ops whose outputs selective recomputation keeps: the weight matmuls (a linear layer on [B, T, D] is a
view and an mm); attention scores (bmm, SDPA) are recomputed."""
if hasattr(_aten, "_grouped_mm"):
    SAVED_OPS.add(_aten._grouped_mm.default)
# megatron-core's tensor-parallel all-reduce works in place on a matmul output: the cache holds that output
# already reduced (it is an alias), so the recomputation takes the all-reduce's result from the cache too,
# instead of reducing the reduced value again (and it sends nothing in backward).
SAVED_OPS.add(torch.ops.c10d.allreduce_.default)


kept_observer = None
"""None, or a callable given every tensor selective recomputation keeps (its cache, which autograd's saved-tensor
hooks do not see) at the end of each recomputed block's forward: ``tools/bench_memory.py`` counts them."""


class _Observed:
    """The first forward's selective-checkpoint context, reporting what it cached on exit."""

    def __init__(self, inner):
        self.inner = inner

    def __enter__(self):
        return self.inner.__enter__()

    def __exit__(self, *exc):
        out = self.inner.__exit__(*exc)
        if kept_observer is not None:
            for entries in self.inner.storage.values():
                for entry in (entries.values() if isinstance(entries, dict) else entries):
                    for leaf in torch.utils._pytree.tree_leaves(entry):
                        leaf = getattr(leaf, "val", leaf)  # torch keeps each output in a version wrapper
                        if isinstance(leaf, torch.Tensor):
                            kept_observer(leaf)
        return out


def _policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


class _Replay:
    """Context of a recomputation: each module's forward state as the first forward saw it, put back as it is
    now afterwards.  Re-enterable: a backward over several outputs with retain_graph (DeepSpeed's pipeline
    engine) recomputes once per backward call."""

    def __init__(self, states: dict, inner):
        self.states, self.inner, self.stack = states, inner, []

    def __enter__(self):
        self.stack.append(({module: module.forward_state() for module in self.states}, recomputation()))
        for module, state in self.states.items():
            module.set_forward_state(state)
        self.stack[-1][1].__enter__()
        self.inner.__enter__()

    def __exit__(self, *exc):
        now, marked = self.stack.pop()
        try:
            self.inner.__exit__(*exc)
        finally:
            marked.__exit__(None, None, None)
            for module, state in now.items():
                module.set_forward_state(state)


class RecomputedBlock(Block):
    """A ``Block`` whose forward runs under ``torch.utils.checkpoint`` (``recompute``: 'full' or 'selective')."""

    recompute: str = "full"

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_grad_enabled():  # evaluation, generation: nothing to recompute
            return super().forward(x)
        states = {m: m.forward_state() for m in self.modules() if isinstance(m, ForwardState)}

        def contexts():
            if self.recompute == "selective":
                first, again = create_selective_checkpoint_contexts(_policy)
                first = first if kept_observer is None else _Observed(first)
            else:
                first, again = nullcontext(), nullcontext()
            return first, _Replay(states, again)

        return checkpoint(super().forward, x, use_reentrant=False, context_fn=contexts)


def apply_recompute(model, cfg):
    """Swap the chosen blocks of ``model`` (a ``SparseLM``, any device) for ``RecomputedBlock``s in place under
    ``parallel.recompute`` none|full|selective; returns ``model``.  The multi-token-prediction depths' blocks
    count after the decoder layers (layer indices n_layers, n_layers + 1, ...; with recompute_every=1 all are
    recomputed, as Megatron-LM recomputes its MTP layers)."""
    p = cfg.parallel
    if p.recompute == "none":
        return model
    blocks = dict(model.all_blocks())
    for i in recomputed_layers(len(blocks), p.recompute_every):
        block = blocks[i]
        if not isinstance(block, Block):
            raise TypeError(f"parallel.recompute: layer {i} is a {type(block).__name__}, not a transformer Block")
        block.__class__ = RecomputedBlock
        block.recompute = p.recompute
    return model
