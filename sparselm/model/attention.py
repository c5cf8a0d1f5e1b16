"""Causal multi-head self-attention with rotary positions and optional grouped-query heads.

Head counts are read from the projection outputs, so tensor parallelism can replace the
projections by sharded ones (fewer local heads) without this module knowing.
"""
import torch
import torch.nn.functional as F
from torch import nn

from sparselm.model.rotary import Rotary


class Attention(nn.Module):
    def __init__(self, mcfg):
        super().__init__()
        self.head_dim = mcfg.head_dim
        d, kv = mcfg.d_model, mcfg.kv_heads * mcfg.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, kv, bias=False)
        self.v_proj = nn.Linear(d, kv, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.o_proj.is_output_proj = True
        self.rotary = Rotary(mcfg.head_dim, mcfg.max_seq_len, mcfg.rope_theta)

    def heads(self, x: torch.Tensor):
        """Project to q, k, v of shape [B, heads, T, head_dim], before rotary (``attend`` applies it)."""
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        return q, k, v

    def attend(self, q, k, v) -> torch.Tensor:
        """Causal attention core over q, k before rotary; subclasses change the pattern or add memory slots."""
        q, k = self.rotary(q), self.rotary(k)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        out = self.attend(*self.heads(x))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
