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
    """Parameters of one MLA: the projections' weights, their biases (model.qkv_bias: the down-projections';
    model.o_bias: the output projection's) and the latent norms' weights."""
    h, qk, v, qr, kr, rope = latent_widths(m)
    biases = (qr + kr + rope) * m.qkv_bias + m.d_model * m.o_bias
    return latent_weights(m) + biases + m.q_lora_rank + m.kv_lora_rank


def latent_core_flops(m, keys: float, padded: bool = False) -> float:
    """Scores (qk channels) and weighted values (v_head_dim channels) of every head against ``keys`` keys;
    ``padded``: as executed, queries, keys and values padded to one head width max(qk, v_head_dim)
    (``LatentAttention``'s flash-kernel padding)."""
    h, qk, v, *_ = latent_widths(m)
    if padded:
        qk = v = max(qk, v)
    return 2 * h * (qk + v) * keys


def latent_activations(m, tp: int) -> float:
    """Elements per token kept for backward besides the block's norm, as measured with autograd's saved-tensor
    hooks (tests/unit/model/test_mla.py).  Whole on every rank: the query latent before and after its norm and
    as the up-projection's input, the key/value latent with the rotary key, its normed part twice likewise, the
    rotary tables.  Per rank's heads, at the attention's one head width w = max(qk, v_head_dim)
    (``LatentAttention`` pads to it so that SDPA runs a flash kernel, which keeps no [T, T] scores): queries and
    keys after rotary, the values (their padded copy when v_head_dim < w, else the up-projection's output they
    are a view of), the attention output, and the output projection's input."""
    h, qk, v, qr, kr, rope = latent_widths(m)
    w = max(qk, v)
    whole = 3 * qr + (kr + rope) + 2 * kr + 4 * rope
    values = h * w if v < w else h * (qk - rope + v)
    return whole + (3 * h * w + values + h * v) / tp


def latent_matmul_outputs(m, tp: int) -> float:
    """Elements per token of its weight-matmul outputs (what selective recomputation keeps): the query latent,
    the key/value latent (whole), the up-projections (per rank) and the output projection."""
    h, qk, v, qr, kr, rope = latent_widths(m)
    return qr + (kr + rope) + (h * qk + h * (qk - rope + v)) / tp + m.d_model
