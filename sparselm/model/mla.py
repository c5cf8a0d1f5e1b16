"""Multi-head latent attention (MLA; DeepSeek-AI 2024, DeepSeek-V2 section 2.1), ``model.attention=mla``.

Per token x [D]: queries q = W_qb norm(W_qa x) (or W_q x without a query latent), H heads of
qk_nope_head_dim + qk_rope_head_dim; a latent c = W_kva x of kv_lora_rank + qk_rope_head_dim, whose first
kv_lora_rank channels, normed, are up-projected per head (W_kvb) into the unrotated key part and the value,
and whose last qk_rope_head_dim channels are one rotary key shared by every head (the decoupled rope).  Rotary
positions apply to the rope channels only; softmax scale (qk_head_dim)^-0.5, times yarn's mscale^2 where
model.rope.mscale_all_dim says so.  The computation follows transformers 5's ``DeepseekV3Attention``
(``models/deepseek_v3/modeling_deepseek_v3.py``); names: ``q_proj`` | ``q_a_proj``, ``q_a_norm``, ``q_b_proj``;
``kv_a_proj`` (their ``kv_a_proj_with_mqa``), ``kv_a_norm``, ``kv_b_proj``, ``o_proj``.

Head counts are read from the up-projections' outputs, so tensor parallelism can shard ``q_proj``/``q_b_proj``,
``kv_b_proj`` (columns, by heads) and ``o_proj`` (rows) and keep the down-projections and latent norms whole
(``sparselm.parallel.mla``); ``shared_key_hook`` is where it makes the shared rotary key's gradient the sum
over the ranks' heads.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.model.attention import QKNorm
from sparselm.model.rotary import Rotary, latent_softmax_scale
from sparselm.model.sparse_attention.kernels import sparse_attention
from sparselm.model.sparse_attention.patterns import PatternSpec


class LatentAttention(nn.Module):
    """``forward(x [B, T, d_model]) -> [B, T, d_model]``, causal (within ``window`` keys when > 0), or under the
    sparse pattern ``acfg`` (the ``attention`` config section: pattern and backend; no persistent memory) when
    its pattern is not causal: patterns choose keys by position, so they apply to the latent scores as they are."""

    def __init__(self, mcfg, window: int = 0, acfg=None):
        super().__init__()
        d, h = mcfg.d_model, mcfg.n_heads
        self.nope, self.rope, self.v_dim = mcfg.qk_nope_head_dim, mcfg.qk_rope_head_dim, mcfg.v_head_dim
        self.kv_rank, self.window = mcfg.kv_lora_rank, window
        qk = self.nope + self.rope
        self.q_lora = mcfg.q_lora_rank > 0
        # DeepSeek's attention_bias: the down-projections and the output projection (model.qkv_bias, o_bias)
        if self.q_lora:
            self.q_a_proj = nn.Linear(d, mcfg.q_lora_rank, bias=mcfg.qkv_bias)
            self.q_a_norm = QKNorm(mcfg.q_lora_rank, mcfg.latent_norm_eps)
            self.q_b_proj = nn.Linear(mcfg.q_lora_rank, h * qk, bias=False)
        else:
            self.q_proj = nn.Linear(d, h * qk, bias=False)
        self.kv_a_proj = nn.Linear(d, self.kv_rank + self.rope, bias=mcfg.qkv_bias)
        self.kv_a_norm = QKNorm(self.kv_rank, mcfg.latent_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(h * self.v_dim, d, bias=mcfg.o_bias)
        self.o_proj.is_output_proj = True
        self.rotary = Rotary(mcfg, dim=self.rope)
        self.scale = latent_softmax_scale(mcfg, qk)
        sparse = acfg is not None and acfg.pattern != "causal"
        self.spec, self.backend = (PatternSpec.from_config(acfg), acfg.backend) if sparse else (None, "auto")
        # Set by tensor parallelism: identity forward, gradient summed over the ranks' heads (the rotary key is
        # one tensor every head of every rank reads).
        self.shared_key_hook = None

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        """[B, T, D] -> [B, heads, T, qk_nope_head_dim + qk_rope_head_dim], before rotary."""
        b, t, _ = x.shape
        q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        return q.view(b, t, -1, self.nope + self.rope).transpose(1, 2)

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, T, D] -> (unrotated keys [B, heads, T, nope], values [B, heads, T, v_head_dim], the shared rotary
        key [B, 1, T, rope] before rotary)."""
        b, t, _ = x.shape
        latent, k_rot = self.kv_a_proj(x).split([self.kv_rank, self.rope], dim=-1)
        if self.shared_key_hook is not None:
            k_rot = self.shared_key_hook(k_rot)
        kv = self.kv_b_proj(self.kv_a_norm(latent)).view(b, t, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        return k_nope, v, k_rot.reshape(b, 1, t, self.rope)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q_nope, q_rot = self.queries(x).split([self.nope, self.rope], dim=-1)
        k_nope, v, k_rot = self.keys_values(x)
        q = torch.cat([q_nope, self.rotary(q_rot)], dim=-1)
        k = torch.cat([k_nope, self.rotary(k_rot).expand(-1, k_nope.shape[1], -1, -1)], dim=-1)
        # Flash kernels (CUDA's and the CPU one) take one head width for queries, keys and values; with
        # qk_head_dim != v_head_dim SDPA would fall back to the math kernel, which keeps the [T, T] scores of
        # every head for backward.  Zero channels change neither the scores nor the first v_head_dim output
        # channels (transformers pads values so for flash attention too).
        width = max(q.shape[-1], self.v_dim)
        q, k, v = (F.pad(z, (0, width - z.shape[-1])) if z.shape[-1] < width else z for z in (q, k, v))
        if self.spec is not None:
            out = sparse_attention(q, k, v, self.spec, backend=self.backend, scale=self.scale)
        elif self.window and self.window < t:
            pos = torch.arange(t, device=x.device)
            lag = pos[:, None] - pos[None, :]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=(lag >= 0) & (lag < self.window), scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o_proj(out[..., :self.v_dim].transpose(1, 2).reshape(b, t, -1))
