"""Cost model of block kind ``allattn``: attention with persistent memory and no feed-forward slot
(Sukhbaatar et al. 2019, "Augmenting Self-attention with Persistent Memory")."""
from __future__ import annotations

from sparselm.model.cost import BlockCost
from sparselm.model.sparse_attention.config import memory_slots


class AllAttentionCost(BlockCost):
    """The shared attention part only, with ``memory_slots(cfg)`` persistent key/value slots per head."""

    has_slot = False

    def memory_slots(self, cfg) -> int:
        """attention.persistent_slots, or the count whose parameters match the feed-forward it replaces."""
        return memory_slots(cfg)
