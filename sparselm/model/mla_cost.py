"""Cost of multi-head latent attention (``model.attention=mla``, ``sparselm.model.mla``): parameters, forward
FLOPs per token, and the elements per token it keeps for backward, in the units of ``sparselm.model.cost``.
No torch here.  Widths: H heads; qk = qk_nope_head_dim + qk_rope_head_dim per query/key head; the query latent
q_lora_rank (0: none); the key/value latent kv_lora_rank; the shared rotary key qk_rope_head_dim.
"""
from __future__ import annotations


def latent_widths(m) -> tuple[int, int, int, int, int, int]:
    """(H, qk, v_head_dim, q_lora_rank, kv_lora_rank, qk_rope_head_dim) of ``cfg.model`` ``m``."""
    return (m.n_heads, m.qk_nope_head_dim + m.qk_rope_head_dim, m.v_head_dim, m.q_lora_rank, m.kv_lora_rank,
            m.qk_rope_head_dim)


def latent_weights(m) -> int:
    """Weights of the projections (every one a matmul per token): q (or q_a and q_b), kv_a, kv_b, o."""
    h, qk, v, qr, kr, rope = latent_widths(m)
    q = m.d_model * qr + qr * h * qk if qr else m.d_model * h * qk
    return q + m.d_model * (kr + rope) + kr * h * (qk - rope + v) + h * v * m.d_model


def latent_params(m) -> int:
    """Parameters of one MLA: the projections' weights and the latent norms' weights."""
    return latent_weights(m) + m.q_lora_rank + m.kv_lora_rank


def latent_core_flops(m, keys: float) -> float:
    """Scores (qk channels) and weighted values (v_head_dim channels) of every head against ``keys`` keys."""
    h, qk, v, *_ = latent_widths(m)
    return 2 * h * (qk + v) * keys


def latent_activations(m, tp: int) -> float:
    """Elements per token kept for backward besides the block's norm: the latents before and after their norms
    and the rotary key (whole on every rank); per rank's heads, queries before and after rotary, the up-projected
    keys/values, keys after rotary, the attention output."""
    h, qk, v, qr, kr, rope = latent_widths(m)
    whole = 2 * qr + (kr + rope) + kr + 2 * rope
    return whole + (2 * h * qk + h * (qk - rope + v) + h * qk + h * v) / tp


def latent_matmul_outputs(m, tp: int) -> float:
    """Elements per token of its weight-matmul outputs (what selective recomputation keeps): the query latent,
    the key/value latent (whole), the up-projections (per rank) and the output projection."""
    h, qk, v, qr, kr, rope = latent_widths(m)
    return qr + (kr + rope) + (h * qk + h * (qk - rope + v)) / tp + m.d_model
