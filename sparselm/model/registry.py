"""Block kinds for ``model.pattern``.

A block is pre-norm attention followed by an optional feed-forward slot.  A kind is a function
``(cfg, layer_idx) -> (attention_module, ffn_module_or_None)`` registered under a name with its cost model.  Layer
packages (MoE, PKM, all-attention) register their kinds on import; ``sparselm.model`` imports
them all.

Contract for the modules a kind returns:
- attention: ``forward(x[B,T,D]) -> y[B,T,D]``;
- ffn slot: ``forward(x[B,T,D])`` returns ``y`` or ``(y, aux_loss)`` where aux_loss is a 0-dim
  tensor already multiplied by its coefficient (it is added to the training loss);
- the kind registers a cost model with it (``sparselm.model.cost.BlockCost``), which FLOP counts, the
  planner and the layout rules read;
- any module may implement the hooks of ``sparselm.model.hooks`` (``metrics``, ``step_metrics``,
  ``after_optimizer_step``, ``active_params``, ``reset_parameters``).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparselm.errors import ConfigError
from sparselm.model.cost import BlockCost, SwiGLUCost


@dataclass(frozen=True)
class BlockKind:
    """A registered block kind."""

    build: Callable
    """``(cfg, layer_idx) -> (attention_module, ffn_module_or_None)``."""
    cost: BlockCost
    """Its cost model (``sparselm.model.cost``): parameters, FLOPs, activations, tensor-parallel widths."""


BLOCKS: dict[str, BlockKind] = {}
"""Block kind name -> its builder and cost model, in registration order."""


def register_block(name: str, cost: BlockCost | None = None):
    """Decorator registering ``fn(cfg, layer_idx)`` as block kind ``name`` with its cost model.  Raises
    TypeError naming the kind when ``cost`` is not a ``BlockCost``: FLOP counts and the planner read it, and a
    kind without one would be counted by guesses."""
    if not isinstance(cost, BlockCost):
        raise TypeError(f"block kind '{name}' is registered without a cost model: pass register_block('{name}', "
                        "cost=...) a sparselm.model.cost.BlockCost (e.g. SwiGLUCost, or a subclass describing the "
                        "feed-forward slot's parameters, FLOPs and activations)")

    def wrap(fn):
        BLOCKS[name] = BlockKind(build=fn, cost=cost)
        return fn

    return wrap


def block_cost(kind: str) -> BlockCost:
    """The cost model of block kind ``kind``.  Raises ConfigError naming the kind and the known ones when it is
    not registered."""
    if kind not in BLOCKS:
        raise ConfigError(f"block kind '{kind}' has no cost model: it is not registered (known kinds: "
                          f"{', '.join(BLOCKS)}); register it with sparselm.model.registry.register_block(name, cost=...)")
    return BLOCKS[kind].cost


def default_attention(cfg, layer_idx: int):
    """The attention every kind uses unless it needs its own (e.g. persistent memory): the pattern
    of the ``attention`` section; dense causal stays the plain SDPA ``Attention``."""
    from sparselm.model.attention import Attention

    acfg = getattr(cfg, "attention", None)
    if cfg.model.attention == "mla":  # multi-head latent attention (config validation refuses persistent memory)
        from sparselm.model.mla import LatentAttention

        return LatentAttention(cfg.model, window=cfg.model.layer_window(layer_idx), acfg=acfg)
    if acfg is None or acfg.pattern == "causal":
        return Attention(cfg.model, window=cfg.model.layer_window(layer_idx))
    from sparselm.model.sparse_attention import SparseAttention

    return SparseAttention(cfg.model, acfg)


@register_block("dense", cost=SwiGLUCost())
def dense_block(cfg, layer_idx: int):
    from sparselm.model.feedforward import SwiGLU

    return default_attention(cfg, layer_idx), SwiGLU(cfg.model.d_model, cfg.model.ffn_hidden)
