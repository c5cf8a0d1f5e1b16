"""Learned attention sinks: one extra logit per query head in every softmax (gpt-oss; Xiao et al. 2023's
"attention sink" made a parameter, as OpenAI's gpt-oss and transformers' ``GptOssAttention`` compute it).

With sink logit ``s_h`` of head ``h``, a query's weights over its visible keys ``j`` are
``exp(l_j) / (exp(s_h) + sum_j exp(l_j))``: the sink takes part in the normalisation and contributes no
value, so a head may attend to nothing.  It is computed exactly, without materialising any mask the path did
not already build, in two ways:

- ``with_sink_key`` (SDPA and the block-sparse path): the sink is one more key whose value is zero and whose
  score is ``s_h`` whatever the query: queries get a channel holding ``s_h / scale`` (per query head, so
  grouped-query heads sharing a key each keep their own sink), context keys 0 there, the sink key 1 there and 0
  elsewhere.  Width is padded to a multiple of 8 with zeros, and the values to the same width (fused flash
  kernels, CPU's included, need one head width for q, k and v; without it SDPA falls back to its math kernel,
  measured 13.7x slower at 4096 tokens on CPU); callers keep the first D output channels.  The sink key goes
  after the keys (a mask path: every query sees it, as persistent memory) or, for ``is_causal`` SDPA, before
  them with one padding query in front, so that the causal diagonal still lines up;
- ``rescale_by_lse`` (FlexAttention): the output without the sink times ``sigmoid(lse - s_h)``, ``lse`` the
  log-sum-exp of the query's scores (torchtitan's gpt-oss does the same).

Shapes: q [B, H, T, E], k [B, Hkv, S, E], v [B, Hkv, S, D], sinks [H] (this rank's heads under tensor
parallelism).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

CHANNEL_MULTIPLE = 8
"""Head width the sink channel is padded to a multiple of (flash / memory-efficient kernels need it)."""


def with_sink_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sinks: torch.Tensor, scale: float,
                  front: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q', k', v') for SDPA at ``scale`` with the sink as a zero-value key scoring exactly ``sinks[h]``; v' is
    zero-padded to the width of q' and k' when narrower (keep the output's first ``v.shape[-1]`` channels).

    ``front=False``: the sink key is key S (after the context; the caller's mask must let every query see
    it, as ``patterns.with_memory`` does).  ``front=True``: it is key 0 and q' has one zero query row in
    front (T + 1 rows), so ``is_causal`` attention over the T + 1 keys lets query t see the sink and context
    keys 0..t; drop output row 0 (``out[..., 1:, :]``)."""
    b, h, t, e = q.shape
    hkv = k.shape[1]
    pad = -(e + 1) % CHANNEL_MULTIPLE + 1  # the sink channel, then zeros
    sink_q = (sinks.to(q.dtype) / scale).view(1, h, 1, 1).expand(b, h, t, 1)
    q2 = torch.cat([q, sink_q, q.new_zeros(b, h, t, pad - 1)], dim=-1)
    k2 = F.pad(k, (0, pad))
    key = k.new_zeros(b, hkv, 1, e + pad)
    key[..., e] = 1
    v = F.pad(v, (0, max(0, e + pad - v.shape[-1])))
    value = v.new_zeros(b, hkv, 1, v.shape[-1])
    if front:
        q2 = F.pad(q2, (0, 0, 1, 0))
        return q2, torch.cat([key, k2], dim=2), torch.cat([value, v], dim=2)
    return q2, torch.cat([k2, key], dim=2), torch.cat([v, value], dim=2)


def causal_with_sinks(q, k, v, sinks, scale: float, gqa: bool) -> torch.Tensor:
    """Causal SDPA (``is_causal``, no mask) of q over k, v with sinks; [B, H, T, D]."""
    q2, k2, v2 = with_sink_key(q, k, v, sinks, scale, front=True)
    out = F.scaled_dot_product_attention(q2, k2, v2, is_causal=True, enable_gqa=gqa, scale=scale)
    return out[:, :, 1:, :v.shape[-1]]


def masked_with_sinks(q, k, v, sinks, scale: float, gqa: bool, mask: torch.Tensor) -> torch.Tensor:
    """SDPA of q over k, v with boolean ``mask`` [T, S] (True: visible) plus the sinks; [B, H, T, D]."""
    q2, k2, v2 = with_sink_key(q, k, v, sinks, scale)
    mask = F.pad(mask, (0, 1), value=True)
    return F.scaled_dot_product_attention(q2, k2, v2, attn_mask=mask, enable_gqa=gqa, scale=scale)[..., :v.shape[-1]]


def rescale_by_lse(out: torch.Tensor, lse: torch.Tensor, sinks: torch.Tensor) -> torch.Tensor:
    """Attention output ``out`` [B, H, T, D] computed without sinks, with ``lse`` [B, H, T] the natural-log
    sum of exp of each query's scores, as if the softmax had included ``sinks`` [H]:
    ``out * Z / (Z + exp(s)) = out * sigmoid(lse - s)``."""
    weight = torch.sigmoid(lse.float() - sinks.float().view(1, -1, 1))
    return out * weight.unsqueeze(-1).to(out.dtype)
