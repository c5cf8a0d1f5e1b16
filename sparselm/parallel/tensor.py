"""Tensor parallelism: megatron-core ``tensor_parallel`` layers swapped into a built model.

The model is built identically on every rank (same seed), then ``apply_tp(model, topo)`` replaces
modules by sharded ones holding this rank's slice of the same weights, so TP=n computes what TP=1
computes up to fp32 reduction order.

Rules.  ``register_tp_rule(ModuleClass)(fn)`` registers ``fn(module, topo) -> replacement or None``.
``apply_tp`` walks the model top-down; for each child it uses the rule of the most specific class in the
child's MRO.  A rule returns the module to put in place (a new one, or the same one changed in place) and
the walk does not enter it; ``None`` leaves it and the walk visits its children.  Built-in rules:
- ``Attention`` -> ``tp_attention``: q/k/v column-parallel, o row-parallel; query and key/value heads are
  split in contiguous blocks (rank r holds query heads [r*H/tp, (r+1)*H/tp) and the kv heads they use,
  so grouped-query attention keeps its grouping).  Subclasses with extra per-head parameters register
  their own rule, call ``tp_attention(module, topo)`` and slice their parameters with
  ``shard_param(p, head_dim_of_p, topo)`` (e.g. persistent memory [kv_heads, N, d] -> dim 0), as
``sparselm.parallel.sparse_attention`` does for ``SparseAttention``::

      @register_tp_rule(SparseAttention)
      def tp_sparse_attention(attn, topo):
          tp_attention(attn, topo)
          attn.memory_k = shard_param(attn.memory_k, 0, topo)
          ...
          return attn

- ``SwiGLU``: gate/up column-parallel, down row-parallel;
- ``LMHead``: vocab-parallel projection and cross-entropy (``sparselm.parallel.vocab``);
- the token embedding becomes megatron's ``VocabParallelEmbedding`` (done by ``apply_tp`` itself: an
  ``nn.Embedding`` rule would also catch unrelated tables); a tied output projection stays tied.
Modules without a rule stay replicated (identical on every TP rank), which is correct but unsharded.

Sharded parameters carry megatron's attributes ``tensor_model_parallel``, ``partition_dim``,
``partition_stride`` (DeepSpeed's gradient norm counts replicated parameters once per TP group by
them); ``full_tensor``/``local_shard`` convert between a shard and the full single-process tensor.
"""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from megatron.core import ModelParallelConfig
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear, set_tensor_model_parallel_attributes
from torch import nn

from sparselm.config import ConfigError
from sparselm.model.attention import Attention
from sparselm.model.feedforward import SwiGLU
from sparselm.parallel.comm import all_gather_cat

_RULES: dict[type, Callable] = {}

# Modules that register rules on import; add yours here (no model code imports sparselm.parallel).
TP_RULE_MODULES = ["sparselm.parallel.vocab", "sparselm.parallel.pkm", "sparselm.parallel.sparse_attention"]


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

    tied = model.head.proj.weight is model.embed.weight
    model.embed = vocab.vocab_parallel_embedding(model.embed, topo)
    _walk(model, topo)
    if tied:  # both are sharded by vocabulary rows in the same way, so one shard serves both
        model.head.proj.weight = model.embed.weight
    return model


def _walk(module: nn.Module, topo) -> None:
    for name, child in module.named_children():
        rule = rule_for(child)
        new = rule(child, topo) if rule is not None else None
        if new is None:
            _walk(child, topo)
        elif new is not child:
            setattr(module, name, new)


# --------------------------------------------------------------------------------- shards
def set_tp_attributes(param: torch.Tensor, dim: int) -> torch.Tensor:
    set_tensor_model_parallel_attributes(param, is_parallel=True, dim=dim, stride=1)
    return param


def shard_param(full: torch.Tensor, dim: int, topo) -> nn.Parameter:
    """This rank's contiguous 1/tp of ``full`` along ``dim`` as a new tensor-parallel Parameter."""
    if full.shape[dim] % topo.tp:
        raise ConfigError(f"cannot shard a tensor of shape {tuple(full.shape)} along dim {dim} over parallel.tp={topo.tp}")
    chunk = full.detach().chunk(topo.tp, dim=dim)[topo.tp_rank].clone()
    return set_tp_attributes(nn.Parameter(chunk, requires_grad=full.requires_grad), dim)


def is_tp_sharded(param: torch.Tensor) -> bool:
    return bool(getattr(param, "tensor_model_parallel", False))


def full_tensor(shard: torch.Tensor, param: torch.Tensor, topo) -> torch.Tensor:
    """The full single-process tensor from every rank's ``shard`` (a value or gradient of ``param``)."""
    if not is_tp_sharded(param) or topo.tp == 1:
        return shard
    return all_gather_cat(shard.detach(), param.partition_dim, topo.tp_group)


def local_shard(full: torch.Tensor, param: torch.Tensor, topo) -> torch.Tensor:
    """This rank's part of the full tensor ``full`` for ``param`` (e.g. loading a canonical checkpoint)."""
    if not is_tp_sharded(param) or topo.tp == 1:
        return full
    return full.chunk(topo.tp, dim=param.partition_dim)[topo.tp_rank]


# --------------------------------------------------------------------------------- linears
def megatron_config(topo, dtype: torch.dtype) -> ModelParallelConfig:
    # perform_initialization=False: the weights are copied from the full model, and megatron's CPU
    # init would draw from the global RNG; the TP attributes it would set are set by set_tp_attributes.
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


def column_parallel(linear: nn.Linear, topo) -> nn.Module:
    """Output features split over TP ranks (the bias with them); the input is the full activation."""
    layer = ColumnLinear(linear.in_features, linear.out_features, config=megatron_config(topo, linear.weight.dtype),
                            init_method=_no_init, bias=linear.bias is not None, gather_output=False,
                            tp_group=topo.tp_group)
    with torch.no_grad():
        layer.weight.copy_(local_shard(linear.weight, set_tp_attributes(layer.weight, 0), topo))
        if linear.bias is not None:
            layer.bias.copy_(local_shard(linear.bias, layer.bias, topo))
    return layer


def row_parallel(linear: nn.Linear, topo) -> nn.Module:
    """Input features split over TP ranks; outputs are summed over the group (the bias is replicated)."""
    layer = RowLinear(linear.in_features, linear.out_features, config=megatron_config(topo, linear.weight.dtype),
                         init_method=_no_init, bias=linear.bias is not None, input_is_parallel=True,
                         skip_bias_add=False, tp_group=topo.tp_group)
    with torch.no_grad():
        layer.weight.copy_(local_shard(linear.weight, set_tp_attributes(layer.weight, 1), topo))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
    return layer


# --------------------------------------------------------------------------------- rules
@register_tp_rule(Attention)
def tp_attention(attn, topo):
    """Shard an ``Attention`` (or subclass) in place by heads; returns it.  For subclass rules to call."""
    attn.q_proj = column_parallel(attn.q_proj, topo)
    attn.k_proj = column_parallel(attn.k_proj, topo)
    attn.v_proj = column_parallel(attn.v_proj, topo)
    attn.o_proj = row_parallel(attn.o_proj, topo)
    return attn


@register_tp_rule(SwiGLU)
def tp_swiglu(ffn, topo):
    """Shard a ``SwiGLU`` in place by hidden units; returns it."""
    ffn.gate_proj = column_parallel(ffn.gate_proj, topo)
    ffn.up_proj = column_parallel(ffn.up_proj, topo)
    ffn.down_proj = row_parallel(ffn.down_proj, topo)
    return ffn
