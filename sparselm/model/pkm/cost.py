"""Cost models of block kinds ``pkm`` (a product-key memory in place of the feed-forward, Lample et al. 2019)
and ``pkm_ffn`` (the memory beside a dense SwiGLU, Memory+ of Berges et al. 2024)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from sparselm.model.cost import BlockCost, swiglu_activations, swiglu_matmul_outputs, swiglu_params


def exact_topk_candidates(knn: int) -> int:
    """Rank pairs (a, b) with (a + 1)(b + 1) <= knn that the exact product-key top-k scores (pkm.lookup)."""
    return sum(knn // (a + 1) for a in range(knn))


@dataclass(frozen=True)
class PKMCost(BlockCost):
    """A product-key memory slot (pkm.heads query heads over pkm.n_keys value rows, knn read per head), with a
    dense SwiGLU of model.d_ff beside it when ``with_ffn``."""

    with_ffn: bool = False
    """Whether a dense SwiGLU runs beside the memory (kind pkm_ffn)."""

    def slot_params(self, cfg, layer_idx: int) -> tuple[int, int]:
        """(total, active per token): the query, norm, sub-key and projection weights, plus the value table
        (a layer reading another's table, pkm.share_values, holds none) or the knn rows a token reads."""
        p, d = cfg.pkm, cfg.model.d_model
        v_dim = p.v_dim or d
        owns_table = not (layer_idx in p.share_values and layer_idx != p.share_values[0])
        dense = self._dense(cfg)
        total, active = dense + (p.n_keys * v_dim if owns_table else 0), dense + p.heads * p.knn * v_dim
        if self.with_ffn:
            n = swiglu_params(d, cfg.model.ffn_hidden)
            total, active = total + n, active + n
        return total, active

    def slot_flops(self, cfg, layer_idx: int) -> dict[str, float]:
        """Forward FLOPs per token: pkm_query, pkm_subkeys (both halves against sqrt(n_keys) sub-keys),
        pkm_topk (comparisons and candidate sums: forward only, no gradient), pkm_values, pkm_proj; ffn."""
        p, d = cfg.pkm, cfg.model.d_model
        v_dim = p.v_dim or d
        flops = {"pkm_query": 2 * p.heads * p.k_dim * d, "pkm_subkeys": 2 * p.heads * p.n_sub * p.k_dim,
                 "pkm_topk": p.heads * (2 * p.n_sub + 2 * exact_topk_candidates(p.knn)),
                 "pkm_values": 2 * p.heads * p.knn * v_dim, "pkm_proj": 2 * self._proj(cfg)}
        if self.with_ffn:
            flops["ffn"] = 2 * swiglu_params(d, cfg.model.ffn_hidden)
        return flops

    def slot_activations(self, cfg, tp: int, act_bytes: int) -> float:
        """Queries, sub-key scores, the knn^2 candidates and their indices and weights, the value read and
        the gated output; plus the SwiGLU's under pkm_ffn."""
        p, d = cfg.pkm, cfg.model.d_model
        memory = p.heads * (2 * p.k_dim + 2 * round(math.sqrt(p.n_keys)) + p.knn * p.knn + 2 * p.knn) + 4 * (p.v_dim or d) / tp
        return (swiglu_activations(cfg.model.ffn_hidden, tp) if self.with_ffn else 0) + memory

    def slot_matmul_outputs(self, cfg, tp: int, act_bytes: int) -> float:
        """The query and sub-key products and the output projections; plus the SwiGLU's under pkm_ffn."""
        p, d = cfg.pkm, cfg.model.d_model
        memory = p.heads * (p.k_dim + 2 * round(math.sqrt(p.n_keys))) + 2 * (p.v_dim or d) / tp
        return (swiglu_matmul_outputs(d, cfg.model.ffn_hidden, tp) if self.with_ffn else 0) + memory

    def tp_widths(self, cfg) -> list[tuple[int, str]]:
        """The SwiGLU beside the memory (pkm_ffn) splits model.d_ff; the memory itself is not split by width."""
        return [(cfg.model.ffn_hidden, "model.d_ff")] if self.with_ffn else []

    @staticmethod
    def _proj(cfg) -> int:
        p, d = cfg.pkm, cfg.model.d_model
        v_dim = p.v_dim or d
        return (v_dim * d if p.gated else 0) + (d * v_dim if (p.gated or v_dim != d) else 0)

    def _dense(self, cfg) -> int:
        p, d = cfg.pkm, cfg.model.d_model
        norm = {"layernorm": 2 * p.k_dim, "batchnorm": 2 * p.heads * p.k_dim}.get(p.query_norm, 0)
        return p.heads * p.k_dim * d + norm + p.heads * p.n_sub * p.k_dim + self._proj(cfg)
