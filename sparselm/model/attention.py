"""Causal multi-head self-attention with rotary positions and optional grouped-query heads.

Head counts are read from the projection outputs, so tensor parallelism can replace the
projections by sharded ones (fewer local heads) without this module knowing.  Options of the Hugging
Face families (model config): a head width other than d_model / n_heads, q/k/v biases, an output-projection
bias, q/k RMSNorm per head or over the full width, clamping of q/k/v, partial or scaled rotary, a sliding window,
learned attention sinks (one logit per query head in every softmax, ``sparselm.model.sinks``).
"""
import torch
import torch.nn.functional as F
from torch import nn

from sparselm.model.rotary import Rotary
from sparselm.model.sinks import causal_with_sinks, masked_with_sinks


class QKNorm(nn.Module):
    """RMSNorm of queries or keys over their last dimension, computed in fp32 as transformers' RMSNorm is.

    Tensor parallelism sets two hooks (model code stays free of collectives): ``mean_square_reducer`` turns
    this rank's mean of squares into the full width's (a 'full' norm whose channels are split over ranks),
    ``weight_hook`` wraps the weight where ranks use it for different heads (a 'per_head' norm: the
    gradient is summed over the ranks)."""

    def __init__(self, width: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(width))
        self.mean_square_reducer = None
        self.weight_hook = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        mean_square = x32.pow(2).mean(-1, keepdim=True)
        if self.mean_square_reducer is not None:
            mean_square = self.mean_square_reducer(mean_square)
        weight = self.weight if self.weight_hook is None else self.weight_hook(self.weight)
        return weight * (x32 * torch.rsqrt(mean_square + self.eps)).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, mcfg, window: int = 0):
        super().__init__()
        self.head_dim = mcfg.head_width
        self.window, self.clip = window, mcfg.clip_qkv
        d, q, kv = mcfg.d_model, mcfg.n_heads * mcfg.head_width, mcfg.kv_heads * mcfg.head_width
        self.q_proj = nn.Linear(d, q, bias=mcfg.qkv_bias)
        self.k_proj = nn.Linear(d, kv, bias=mcfg.qkv_bias)
        self.v_proj = nn.Linear(d, kv, bias=mcfg.qkv_bias)
        self.o_proj = nn.Linear(q, d, bias=mcfg.o_bias)
        self.o_proj.is_output_proj = True
        # gpt-oss: a learned logit per query head that joins every softmax (sparselm.model.sinks)
        self.sinks = nn.Parameter(torch.empty(mcfg.n_heads)) if mcfg.attention_sinks else None
        self.qk_norm = mcfg.qk_norm
        if mcfg.qk_norm != "none":
            full = mcfg.qk_norm == "full"
            self.q_norm = QKNorm(q if full else self.head_dim, mcfg.norm_eps)
            self.k_norm = QKNorm(kv if full else self.head_dim, mcfg.norm_eps)
        self.rotary = Rotary(mcfg)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The sinks start at 0 (a sink as likely as a key of score 0); the projections and norms are
        initialised as modules of their own."""
        if self.sinks is not None:
            nn.init.zeros_(self.sinks)

    def heads(self, x: torch.Tensor):
        """Project to q, k, v of shape [B, heads, T, head_dim], before rotary (``attend`` applies it)."""
        b, t, _ = x.shape
        split = lambda y: y.view(b, t, -1, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip:
            q, k, v = (y.clamp(-self.clip, self.clip) for y in (q, k, v))
        q, k, v = split(q), split(k), split(v)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def head_sinks(self) -> torch.Tensor | None:
        """The sink logits of the heads ``attend`` sees ([H] or None); context parallelism narrows them to a rank's
        heads as it does the memory rows."""
        return self.sinks

    def attend(self, q, k, v) -> torch.Tensor:
        """Causal attention core over q, k before rotary; subclasses change the pattern or add memory slots."""
        q, k = self.rotary(q), self.rotary(k)
        gqa = q.shape[1] != k.shape[1]
        sinks = self.head_sinks()
        t, scale = q.shape[-2], q.shape[-1] ** -0.5
        if self.window and self.window < t:
            pos = torch.arange(t, device=q.device)
            lag = pos[:, None] - pos[None, :]
            mask = (lag >= 0) & (lag < self.window)
            if sinks is not None:
                return masked_with_sinks(q, k, v, sinks, scale, gqa, mask)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        if sinks is not None:
            return causal_with_sinks(q, k, v, sinks, scale, gqa)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        out = self.attend(*self.heads(x))
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
