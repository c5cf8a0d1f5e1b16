"""Product-key memory layer (Lample et al. 2019) with the optional Memory+ gate (Berges et al. 2024).

All weights are Parameters of this module itself (no nn.Linear children), so the model's generic
normal init, which visits children after their parent, cannot overwrite the special init below.
``read`` and ``project`` are the two places tensor parallelism changes (sparselm/parallel/pkm.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.model.pkm.lookup import product_key_topk
from sparselm.model.pkm.read import weighted_read
from sparselm.model.pkm.usage import SlotUsage
from sparselm.model.recompute import recomputing

VALUE_GROUP = "pkm_values"


class QueryNorm(nn.Module):
    """LayerNorm per head (causal-safe) or BatchNorm over all heads (Lample 2019; leaks across time)."""

    def __init__(self, kind: str, heads: int, k_dim: int):
        super().__init__()
        self.kind = kind
        if kind == "layernorm":
            self.norm = nn.LayerNorm(k_dim)
        elif kind == "batchnorm":
            self.norm = nn.BatchNorm1d(heads * k_dim)
        else:
            self.norm = nn.Identity()

    def forward(self, q: torch.Tensor) -> torch.Tensor:  # q: [n, heads, k_dim]
        if self.kind == "batchnorm":
            return self.norm(q.flatten(1)).view_as(q)
        return self.norm(q)


class ProductKeyMemory(nn.Module):
    """x[..., d_model] -> y[..., d_model]: sum over heads of softmax-weighted values of the top-knn keys.

    ``shared_from``: index of the layer whose value table this one reads; the table is then bound by
    ``bind_shared`` once all layers exist, and this module neither allocates nor initialises one.
    """

    def __init__(self, d_model: int, pcfg, init_std: float = 0.02, out_std: float | None = None,
                 shared_from: int | None = None):
        super().__init__()
        self.d_model, self.heads, self.knn, self.k_dim = d_model, pcfg.heads, pcfg.knn, pcfg.k_dim
        self.n_keys, self.n_sub = pcfg.n_keys, pcfg.n_sub
        self.v_dim = pcfg.v_dim or d_model
        self.gated = pcfg.gated
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        self.value_init_std = pcfg.value_init_std or self.v_dim ** -0.5
        self.shared_from = shared_from

        self.query_weight = nn.Parameter(torch.empty(self.heads * self.k_dim, d_model))
        self.query_norm = QueryNorm(pcfg.query_norm, self.heads, self.k_dim)
        self.keys = nn.Parameter(torch.empty(self.heads, 2, self.n_sub, self.k_dim // 2))
        if shared_from is None:
            self.values = nn.Parameter(torch.empty(self.n_keys, self.v_dim))
            tag_values(self.values, pcfg)
        else:
            self.register_parameter("values", None)
        self.gate_weight = nn.Parameter(torch.empty(self.v_dim, d_model)) if self.gated else None
        needs_out = self.gated or self.v_dim != d_model
        self.out_weight = nn.Parameter(torch.empty(d_model, self.v_dim)) if needs_out else None
        self.usage = SlotUsage(self.n_keys, pcfg.usage_window, pcfg.dead_after)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.query_weight, 0.0, self.d_model ** -0.5)
        bound = (self.k_dim // 2) ** -0.5  # Lample 2019: uniform sub-keys in +-1/sqrt(half width)
        nn.init.uniform_(self.keys, -bound, bound)
        if self.shared_from is None:
            nn.init.normal_(self.values, 0.0, self.value_init_std)
        if self.gate_weight is not None:
            nn.init.normal_(self.gate_weight, 0.0, self.init_std)
        if self.out_weight is not None:
            nn.init.normal_(self.out_weight, 0.0, self.out_std)

    def bind_shared(self, layers) -> None:
        """Read the value table of layer ``shared_from`` (its ProductKeyMemory) from now on."""
        if self.shared_from is None:
            return
        owners = [m for m in layers[self.shared_from].modules() if isinstance(m, ProductKeyMemory)]
        if len(owners) != 1 or owners[0].shared_from is not None:
            raise ValueError(f"layer {self.shared_from} holds no PKM value table to share")
        self.values = owners[0].values

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x[n, d_model] -> (weights, slots), both [n, heads, knn]."""
        q = self.query_norm(F.linear(x, self.query_weight).view(-1, self.heads, self.k_dim))
        scores, slots = product_key_topk(q, self.keys, self.knn)
        return torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)), slots

    def read(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Weighted sum of the selected value rows: [n, v_dim]."""
        n = slots.shape[0]
        return weighted_read(slots.reshape(n, -1), weights.reshape(n, -1), self.values)

    def project(self, memory: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        if self.gate_weight is not None:
            memory = memory * F.silu(F.linear(x, self.gate_weight))
        if self.out_weight is not None:
            memory = F.linear(memory, self.out_weight)
        return memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.values is None:
            raise RuntimeError(f"this PKM layer shares the value table of layer {self.shared_from}, but it was "
                               "never bound: the model must call bind_shared(layers) after building its layers")
        flat = x.reshape(-1, x.shape[-1])
        weights, slots = self.lookup(flat)
        if self.training and not recomputing():  # a recomputed forward reads the same slots again
            self.usage.record(slots, weights)  # summarised once per optimizer step (usage.step_metrics)
        y = self.project(self.read(slots, weights.to(self.values.dtype)), flat)
        return y.view(*x.shape[:-1], y.shape[-1])

    def active_params(self) -> int:
        """Parameters one token uses: everything but the value rows it does not read."""
        dense = sum(p.numel() for name, p in self.named_parameters() if name != "values")
        return dense + self.heads * self.knn * self.v_dim


def tag_values(param: nn.Parameter, pcfg) -> None:
    """Put a value table in its own optimizer group (see sparselm/training/optim.py)."""
    param.optim_group = VALUE_GROUP
    param.optim_overrides = {"lr_scale": pcfg.value_lr_scale, "weight_decay": pcfg.value_weight_decay}
    if pcfg.value_grad_clip > 0:
        param.optim_overrides["grad_clip"] = pcfg.value_grad_clip
