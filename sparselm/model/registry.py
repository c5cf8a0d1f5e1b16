"""Block kinds for ``model.pattern``.

A block is pre-norm attention followed by an optional feed-forward slot.  A kind is a function
``(cfg, layer_idx) -> (attention_module, ffn_module_or_None)`` registered under a name.  Layer
packages (MoE, PKM, all-attention) register their kinds on import; ``sparselm.model`` imports
them all.

Contract for the modules a kind returns:
- attention: ``forward(x[B,T,D]) -> y[B,T,D]``;
- ffn slot: ``forward(x[B,T,D])`` returns ``y`` or ``(y, aux_loss)`` where aux_loss is a 0-dim
  tensor already multiplied by its coefficient (it is added to the training loss);
- any module may implement the hooks of ``sparselm.model.hooks`` (``metrics``, ``step_metrics``,
  ``after_optimizer_step``, ``active_params``, ``reset_parameters``).
"""
from __future__ import annotations

from typing import Callable

BLOCKS: dict[str, Callable] = {}


def register_block(name: str):
    def wrap(fn):
        BLOCKS[name] = fn
        return fn

    return wrap


def default_attention(cfg, layer_idx: int):
    """The attention every kind uses unless it needs its own (e.g. persistent memory): the pattern
    of the ``attention`` section; dense causal stays the plain SDPA ``Attention``."""
    from sparselm.model.attention import Attention

    acfg = getattr(cfg, "attention", None)
    if acfg is None or acfg.pattern == "causal":
        return Attention(cfg.model, window=cfg.model.layer_window(layer_idx))
    from sparselm.model.sparse_attention import SparseAttention

    return SparseAttention(cfg.model, acfg)


@register_block("dense")
def dense_block(cfg, layer_idx: int):
    from sparselm.model.feedforward import SwiGLU

    return default_attention(cfg, layer_idx), SwiGLU(cfg.model.d_model, cfg.model.ffn_hidden)
