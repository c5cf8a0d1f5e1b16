"""Tensor parallelism of multi-head latent attention (``sparselm.model.mla.LatentAttention``).

Heads are split in contiguous blocks as ``tp_attention`` splits them: the query up-projection (``q_proj`` or
``q_b_proj``) and the key/value up-projection ``kv_b_proj`` column-parallel, ``o_proj`` row-parallel.  The
down-projections (``q_a_proj``, ``kv_a_proj``) and the latent norms stay whole on every rank (they are
small, and every head reads them): their gradients are whole too, since the column-parallel up-projections
sum their input gradients over the group, and ``shared_key_hook`` sums the shared rotary key's (the part of
``kv_a_proj``'s output no up-projection reads).  This is transformers' DeepSeek-V3 plan and Megatron's MLA.
"""
from __future__ import annotations

from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from sparselm.model.mla import LatentAttention
from sparselm.parallel.tensor import column_parallel, register_tp_rule, row_parallel


@register_tp_rule(LatentAttention)
def tp_latent_attention(attn, topo):
    """Shard a ``LatentAttention`` in place by heads; returns it."""
    if attn.q_lora:
        attn.q_b_proj = column_parallel(attn.q_b_proj, topo)
    else:
        attn.q_proj = column_parallel(attn.q_proj, topo)
    attn.kv_b_proj = column_parallel(attn.kv_b_proj, topo)
    attn.o_proj = row_parallel(attn.o_proj, topo)
    attn.shared_key_hook = lambda k, group=topo.tp_group: copy_to_tensor_model_parallel_region(k, group)
    return attn
