"""Sparse all-attention: attention patterns and persistent memory (the ``attention`` config section).

Patterns (``attention.pattern``, applied to every layer), each a FlexAttention mask_mod in patterns.py:
- ``causal``: dense causal attention (SDPA);
- ``sliding_window``: the last ``window`` tokens;
- ``strided`` / ``fixed``: Child et al. 2019, with ``stride`` (and ``summary`` for fixed);
- ``block_local``: causal attention inside blocks of ``block`` tokens;
- ``bigbird``: global + window + random blocks (Zaheer et al. 2020), reproducible from ``seed``.

Block kind ``allattn``: attention with ``persistent_slots`` learned key/value vectors per head and no
feed-forward (Sukhbaatar et al. 2019).
"""
from sparselm.model.registry import register_block
from sparselm.model.sparse_attention.config import AttentionConfig, memory_slots
from sparselm.model.sparse_attention.cost import AllAttentionCost
from sparselm.model.sparse_attention.module import SparseAttention

__all__ = ["AttentionConfig", "SparseAttention"]


@register_block("allattn", cost=AllAttentionCost())
def allattn_block(cfg, layer_idx: int):
    """All-attention layer: persistent memory takes the place of the feed-forward."""
    return SparseAttention(cfg.model, cfg.attention, memory_slots(cfg)), None
