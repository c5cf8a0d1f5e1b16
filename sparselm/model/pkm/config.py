"""The ``pkm`` config section and its start-up checks."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from sparselm.errors import require

PKM_KINDS = ("pkm", "pkm_ffn")


@dataclass
class PKMConfig:
    """Product-key memory layers (block kinds `pkm`, `pkm_ffn`): keys, lookup, values, usage metrics."""

    n_keys: int = 16384
    """Memory slots (rows of the value table); a perfect square: each query half is scored against sqrt(n_keys) sub-keys."""
    heads: int = 4
    """Memory heads: each has its own query and sub-keys and reads knn slots of the shared value table."""
    knn: int = 32
    """Slots read per head and token; at most sqrt(n_keys) (the top-knn of each half must exist)."""
    k_dim: int = 128
    """Query/key width per head; even, split into two halves of k_dim/2."""
    v_dim: int = 0
    """Value width; 0 means model.d_model. Must be divisible by parallel.tp (the table is sharded along it)."""
    query_norm: Literal["layernorm", "batchnorm", "none"] = "layernorm"
    """Normalisation of the queries: 'layernorm' (per token, causal-safe), 'batchnorm' (Lample 2019; mixes
    statistics over the batch and time, so it leaks future tokens in a causal LM: non-causal use only), 'none'."""
    gated: bool = False
    """Memory+ output (Berges 2024): out_proj(memory(x) * silu(gate_proj(x))) instead of memory(x)."""
    value_init_std: float = 0.0
    """Std of the normal init of the values; 0 means v_dim ** -0.5 (Lample 2019)."""
    value_lr_scale: float = 10.0
    """Learning rate of the value tables relative to optim.lr.  Lample 2019 trained values with their own
    (sparse) Adam at a higher rate than the rest; lucidrains' product-key-memory recommends lr 1e-2 for values."""
    value_weight_decay: float = 0.0
    """Weight decay of the value tables.  0 (Lample 2019): decoupled decay shrinks every row each step,
    including the many rows a step does not read."""
    value_grad_clip: float = 0.0
    """Clip the gradient norm of the value tables on their own to this; 0 leaves them to optim.grad_clip only."""
    share_values: list[int] = field(default_factory=list)
    """Indices of PKM layers that read one shared value table, owned by the first listed; empty: one table per layer."""
    usage_window: int = 100
    """Optimizer steps in the usage window: pkm_read_frac counts slots read within it; pkm_usage_kl uses an
    exponential average of read weight with this time constant."""
    dead_after: int = 1000
    """A slot not read for this many optimizer steps counts as dead (pkm_dead_slots)."""

    @property
    def n_sub(self) -> int:
        return math.isqrt(self.n_keys)



def validate_pkm(cfg) -> None:
    p, m = cfg.pkm, cfg.model
    kinds = m.layer_kinds()
    pkm_layers = [i for i, k in enumerate(kinds) if k in PKM_KINDS]
    if not pkm_layers and not p.share_values:
        return
    require(p.n_keys > 0 and p.n_sub ** 2 == p.n_keys,
             f"pkm.n_keys={p.n_keys} is not a perfect square; use e.g. {max(1, p.n_sub) ** 2} or {(p.n_sub + 1) ** 2}")
    require(1 <= p.knn <= p.n_sub,
             f"pkm.knn={p.knn} must be between 1 and the sqrt(pkm.n_keys)={p.n_sub} sub-keys per query half; "
             f"lower pkm.knn or raise pkm.n_keys")
    require(p.heads >= 1, f"pkm.heads must be >= 1, got {p.heads}")
    require(p.k_dim >= 2 and p.k_dim % 2 == 0, f"pkm.k_dim={p.k_dim} must be even and >= 2 (it is split into two halves)")
    require(p.v_dim >= 0, f"pkm.v_dim must be >= 0 (0 means model.d_model), got {p.v_dim}")
    v_dim = p.v_dim or m.d_model
    tp = cfg.parallel.tp
    require(v_dim % tp == 0, f"the PKM value width {v_dim} (pkm.v_dim, 0 = model.d_model) is not divisible by "
                              f"parallel.tp={tp}; the value table is sharded along it")
    require(p.value_init_std >= 0, f"pkm.value_init_std must be >= 0, got {p.value_init_std}")
    require(p.value_lr_scale > 0, f"pkm.value_lr_scale must be positive, got {p.value_lr_scale}")
    require(p.value_weight_decay >= 0, f"pkm.value_weight_decay must be >= 0, got {p.value_weight_decay}")
    require(p.value_grad_clip >= 0, f"pkm.value_grad_clip must be >= 0, got {p.value_grad_clip}")
    require(p.usage_window >= 1 and p.dead_after >= 1,
             f"pkm.usage_window ({p.usage_window}) and pkm.dead_after ({p.dead_after}) must be >= 1")
    if p.share_values:
        require(len(p.share_values) >= 2 and len(set(p.share_values)) == len(p.share_values),
                 f"pkm.share_values={p.share_values} must list at least two distinct PKM layer indices")
        require(cfg.parallel.pp == 1, f"pkm.share_values needs parallel.pp=1: pipeline stages cannot hold one table "
                                       f"between them (got parallel.pp={cfg.parallel.pp})")
        for i in p.share_values:
            require(i in pkm_layers,
                     f"pkm.share_values names layer {i}, which is not a PKM layer; PKM layers of model.pattern "
                     f"over model.n_layers={m.n_layers}: {pkm_layers or 'none'}")
