"""Tensor parallelism: megatron-core ``tensor_parallel`` layers swapped into a built model.

``apply_tp(model, topo)`` replaces modules of the one-process model by sharded ones holding this rank's
piece of the same weights (``sparselm.parallel.pieces``), so TP=n computes what TP=1 computes up to fp32
reduction order.  The model is normally on the meta device (``build_model(cfg, device="meta")``): rules
then only describe each piece, and ``sparselm.parallel.materialize`` gives it memory and values; given a
real model, the rules cut the pieces out of its values.

Rules.  ``register_tp_rule(ModuleClass)(fn)`` registers ``fn(module, topo) -> replacement or None``.
``apply_tp`` walks the model top-down; for each child it uses the rule of the most specific class in the
child's MRO.  A rule returns the module to put in place (a new one, or the same one changed in place) and
the walk does not enter it; ``None`` leaves it and the walk visits its children.  Built-in rules:
- ``Attention`` -> ``tp_attention``: q/k/v column-parallel, o row-parallel (its bias replicated), the sinks
  (one per query head) split with the heads; query and key/value heads are split in contiguous blocks (rank r holds query heads [r*H/tp, (r+1)*H/tp) and the kv heads they use,
  so grouped-query attention keeps its grouping).  Subclasses with extra per-head parameters register
  their own rule, call ``tp_attention(module, topo)`` and cut their parameters with
  ``shard_(p, Shard(head_dim_of_p, "tp"), tp_groups(topo))`` (e.g. persistent memory [kv_heads, N, d] ->
  dim 0), as ``sparselm.parallel.sparse_attention`` does for ``SparseAttention``::

      @register_tp_rule(SparseAttention)
      def tp_sparse_attention(attn, topo):
          tp_attention(attn, topo)
          shard_(attn.memory_k, Shard(0, "tp"), tp_groups(topo))
          ...
          return attn

- ``SwiGLU``: gate/up column-parallel, down row-parallel;
- ``LMHead``: vocab-parallel projection and cross-entropy (``sparselm.parallel.vocab``);
- the token embedding becomes megatron's ``VocabParallelEmbedding`` (done by ``apply_tp`` itself: an
  ``nn.Embedding`` rule would also catch unrelated tables); a tied output projection stays tied.
Modules without a rule stay replicated (identical on every TP rank), which is correct but unsharded.

Sharded parameters carry their ``placements`` and megatron's attributes ``tensor_model_parallel``,
``partition_dim``, ``partition_stride`` (DeepSpeed's gradient norm counts replicated parameters once per
TP group by them); ``pieces.assemble`` gathers the full single-process tensor.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from torch import nn

from sparselm.model.attention import Attention
from sparselm.model.feedforward import SwiGLU
from sparselm.model.init import deferred_init
from sparselm.parallel.pieces import Shard, shard_

_RULES: dict[type, Callable] = {}

# Modules that register rules on import; add yours here (no model code imports sparselm.parallel).
TP_RULE_MODULES = ["sparselm.parallel.vocab", "sparselm.parallel.pkm", "sparselm.parallel.sparse_attention",
                   "sparselm.parallel.mla"]


def register_tp_rule(module_class: type):
    """Decorator: ``fn(module, topo) -> replacement or None`` for instances of ``module_class``."""

    def wrap(fn):
        _RULES[module_class] = fn
        return fn

    return wrap


def rule_for(module: nn.Module) -> Callable | None:
    for klass in type(module).__mro__:
        if klass in _RULES:
            return _RULES[klass]
    return None


def apply_tp(model: nn.Module, topo) -> nn.Module:
    """Shard ``model`` (a SparseLM) in place for ``topo.tp`` ranks; returns it."""
    if topo.tp == 1:
        return model
    for name in TP_RULE_MODULES:
        importlib.import_module(name)
    from sparselm.parallel import vocab

    model.embed = vocab.vocab_parallel_embedding(model.embed, topo)
    _walk(model, topo)  # a tied output projection is the same Parameter, cut once (pieces.shard_)
    return model


def _walk(module: nn.Module, topo) -> None:
    for name, child in module.named_children():
        rule = rule_for(child)
        new = rule(child, topo) if rule is not None else None
        if new is None:
            _walk(child, topo)
        elif new is not child:
            setattr(module, name, new)


# --------------------------------------------------------------------------------- linears
def tp_groups(topo) -> dict:
    return {"tp": topo.tp_group}


def megatron_config(topo, dtype: torch.dtype) -> ModelParallelConfig:
    # perform_initialization=False: megatron's CPU init would draw from the global RNG; values come from
    # sparselm.parallel.materialize (or the full tensor being cut), the attributes from pieces.place.
    return ModelParallelConfig(tensor_model_parallel_size=topo.tp, use_cpu_initialization=True,
                               perform_initialization=False, params_dtype=dtype)


def _no_init(_weight):
    pass


class ColumnLinear(ColumnParallelLinear):
    """ColumnParallelLinear returning only the output (this rank's output features), like nn.Linear."""

    # megatron adds an empty "_extra_state" entry to state_dict; keep the one-process model's names
    get_extra_state = nn.Module.get_extra_state

    def forward(self, x):
        return super().forward(x)[0]


class RowLinear(RowParallelLinear):
    """RowParallelLinear on already-split input features, returning only the (all-reduced) output."""

    get_extra_state = nn.Module.get_extra_state

    def forward(self, x):
        return super().forward(x)[0]


def adopt(layer: nn.Module, attr: str, param: nn.Parameter | None, shard: Shard | None, topo) -> None:
    """Make ``param`` (cut in place to this rank's piece along ``shard``; None: replicated) the ``attr`` of a
    megatron ``layer``, keeping the attributes megatron set on its own (never allocated) parameter."""
    own = getattr(layer, attr)
    if param is None:
        return
    if shard is not None:
        shard_(param, shard, tp_groups(topo))
    for key, value in own.__dict__.items():
        if key not in param.__dict__:
            setattr(param, key, value)
    setattr(layer, attr, param)


def column_parallel(linear: nn.Linear, topo) -> nn.Module:
    """Output features split over TP ranks (the bias with them); the input is the full activation."""
    with deferred_init():  # megatron allocates its own weight; ours (cut from ``linear``) replaces it
        layer = ColumnLinear(linear.in_features, linear.out_features, config=megatron_config(topo, linear.weight.dtype),
                             init_method=_no_init, bias=linear.bias is not None, gather_output=False,
                             tp_group=topo.tp_group)
    adopt(layer, "weight", linear.weight, Shard(0, "tp"), topo)
    adopt(layer, "bias", linear.bias, Shard(0, "tp"), topo)
    _keep_module_attributes(linear, layer)
    return layer


def row_parallel(linear: nn.Linear, topo) -> nn.Module:
    """Input features split over TP ranks; outputs are summed over the group (the bias is replicated)."""
    with deferred_init():
        layer = RowLinear(linear.in_features, linear.out_features, config=megatron_config(topo, linear.weight.dtype),
                          init_method=_no_init, bias=linear.bias is not None, input_is_parallel=True,
                          skip_bias_add=False, tp_group=topo.tp_group)
    adopt(layer, "weight", linear.weight, Shard(1, "tp"), topo)
    adopt(layer, "bias", linear.bias, None, topo)
    _keep_module_attributes(linear, layer)
    return layer


def _keep_module_attributes(linear: nn.Module, layer: nn.Module) -> None:
    if getattr(linear, "is_output_proj", False):
        layer.is_output_proj = True


# --------------------------------------------------------------------------------- rules
@register_tp_rule(Attention)
def tp_attention(attn, topo):
    """Shard an ``Attention`` (or subclass) in place by heads; returns it.  For subclass rules to call."""
    attn.q_proj = column_parallel(attn.q_proj, topo)
    attn.k_proj = column_parallel(attn.k_proj, topo)
    attn.v_proj = column_parallel(attn.v_proj, topo)
    attn.o_proj = row_parallel(attn.o_proj, topo)
    if getattr(attn, "sinks", None) is not None:  # one logit per query head: split with the heads
        shard_(attn.sinks, Shard(0, "tp"), tp_groups(topo))
    if getattr(attn, "qk_norm", "none") == "full":  # channels split with the heads; mean of squares summed
        for norm in (attn.q_norm, attn.k_norm):
            shard_(norm.weight, Shard(0, "tp"), tp_groups(topo))
            norm.mean_square_reducer = _MeanOverGroup(topo.tp_group, topo.tp)
    elif getattr(attn, "qk_norm", "none") == "per_head":  # one weight used by each rank's heads: grads summed
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        for norm in (attn.q_norm, attn.k_norm):
            norm.weight_hook = lambda w, group=topo.tp_group: copy_to_tensor_model_parallel_region(w, group)
    return attn


class _MeanOverGroup:
    """Mean of a tensor over a process group, differentiable (the gradient is summed back over the group)."""

    def __init__(self, group, size: int):
        self.group, self.size = group, size

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed.nn.functional as dist_fn

        return dist_fn.all_reduce(x, group=self.group) / self.size


@register_tp_rule(SwiGLU)
def tp_swiglu(ffn, topo):
    """Shard a ``SwiGLU`` in place by hidden units; returns it."""
    ffn.gate_proj = column_parallel(ffn.gate_proj, topo)
    ffn.up_proj = column_parallel(ffn.up_proj, topo)
    ffn.down_proj = row_parallel(ffn.down_proj, topo)
    return ffn
