"""Tensor names between sparselm's canonical checkpoints and a Hugging Face family's, both ways.

sparselm: ``embed.weight``, ``layers.{i}.attn.q_proj.weight``, ``layers.{i}.ffn.experts.gate_up_proj`` ...;
Hugging Face (transformers 5, ``save_pretrained``): ``model.embed_tokens.weight``,
``model.layers.{i}.self_attn.q_proj.weight``, per-expert ``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``
or fused ``model.layers.{i}.mlp.experts.gate_up_proj``.  Where a family differs (Mixtral's module and expert
weight names, the shared experts' module) its ``Family`` record says so.
"""
from __future__ import annotations

from sparselm.convert.experts import PARTS, STACKED
from sparselm.convert.hf_family import Family

GLOBAL = {"embed.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight",
          "head.proj.weight": "lm_head.weight"}
"""ours -> theirs outside the layers."""
ATTENTION = {"input_norm.weight": "input_layernorm.weight", "post_attn_norm.weight": "post_attention_layernorm.weight",
             "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
             "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.o_proj.weight": "self_attn.o_proj.weight",
             "attn.q_proj.bias": "self_attn.q_proj.bias", "attn.k_proj.bias": "self_attn.k_proj.bias",
             "attn.v_proj.bias": "self_attn.v_proj.bias", "attn.q_norm.weight": "self_attn.q_norm.weight",
             "attn.k_norm.weight": "self_attn.k_norm.weight", "attn.o_proj.bias": "self_attn.o_proj.bias",
             "attn.sinks": "self_attn.sinks"}
"""ours -> theirs in a layer (after ``layers.{i}.`` / ``model.layers.{i}.``): norms and attention."""
LATENT_ATTENTION = {"input_norm.weight": "input_layernorm.weight",
                    "post_attn_norm.weight": "post_attention_layernorm.weight",
                    "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.q_a_proj.weight": "self_attn.q_a_proj.weight",
                    "attn.q_a_norm.weight": "self_attn.q_a_layernorm.weight",
                    "attn.q_b_proj.weight": "self_attn.q_b_proj.weight",
                    "attn.kv_a_proj.weight": "self_attn.kv_a_proj_with_mqa.weight",
                    "attn.kv_a_norm.weight": "self_attn.kv_a_layernorm.weight",
                    "attn.kv_b_proj.weight": "self_attn.kv_b_proj.weight",
                    "attn.o_proj.weight": "self_attn.o_proj.weight", "attn.q_a_proj.bias": "self_attn.q_a_proj.bias",
                    "attn.kv_a_proj.bias": "self_attn.kv_a_proj_with_mqa.bias",
                    "attn.o_proj.bias": "self_attn.o_proj.bias"}
"""ours -> theirs in a layer of an MLA family (``Family.mla``): norms and multi-head latent attention."""
MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight", "eh_proj.weight": "eh_proj.weight",
       "norm.weight": "shared_head.norm.weight"}
"""ours (after ``mtp.{k}.``) -> theirs (after ``model.layers.{n_layers + k}.``): a multi-token-prediction layer's own
tensors; its block is named as a decoder layer, and it also stores copies of the embedding and output head
(``MTP_COPIES``)."""
MTP_COPIES = {"embed.weight": "embed_tokens.weight", "head.proj.weight": "shared_head.head.weight"}
"""ours (the shared tensors) -> theirs (after ``model.layers.{n_layers + k}.``): the copies DeepSeek-V3's
multi-token-prediction layers carry; export writes them, import reads the shared ones instead."""
SWIGLU = {"gate_proj.weight": "gate_proj.weight", "up_proj.weight": "up_proj.weight", "down_proj.weight": "down_proj.weight"}
"""ours -> theirs in a dense or shared-expert SwiGLU."""


def moe_prefix(fam: Family, i: int, fused: bool) -> str:
    """The MoE block of layer ``i``: ``fam.moe_module`` in the per-expert layout, ``mlp`` in the fused one."""
    return f"model.layers.{i}.{'mlp' if fused else fam.moe_module}"


def expert_name(fam: Family, i: int, e: int, part: str) -> str:
    """Hugging Face name of ``part`` ('gate', 'up', 'down') of expert ``e`` of layer ``i``, per-expert layout."""
    return f"{moe_prefix(fam, i, False)}.experts.{e}.{fam.expert_weights[PARTS.index(part)]}.weight"


def stacked_name(i: int, part: str, fused_hf: bool = False) -> str:
    """The stacked tensor holding ``part`` of layer ``i``'s experts: ours (``layers.{i}.ffn.experts.*``) or, with
    ``fused_hf``, transformers 5's (``model.layers.{i}.mlp.experts.*``)."""
    return f"model.layers.{i}.mlp.experts.{STACKED[part]}" if fused_hf else f"layers.{i}.ffn.experts.{STACKED[part]}"


def layer_renames(fam: Family, i: int, kind: str, fused: bool) -> dict[str, str]:
    """ours -> theirs for the one-to-one tensors of layer ``i`` ('dense' or 'moe'): attention, norms, dense MLP,
    router, shared experts; the routed experts are named by ``expert_name`` / ``stacked_name``."""
    out = {f"layers.{i}.{a}": f"model.layers.{i}.{b}" for a, b in (LATENT_ATTENTION if fam.mla else ATTENTION).items()}
    if kind == "dense":
        out.update({f"layers.{i}.ffn.{a}": f"model.layers.{i}.mlp.{b}" for a, b in SWIGLU.items()})
        return out
    p = moe_prefix(fam, i, fused)
    out[f"layers.{i}.ffn.router.weight"] = f"{p}.{fam.router_module}.weight"
    out[f"layers.{i}.ffn.router.bias"] = f"{p}.{fam.router_module}.bias"
    out[f"layers.{i}.ffn.router.expert_bias"] = f"{p}.{selection_bias_name(fam, fused)}"
    if fam.shared_experts:
        module = fam.shared_experts.module
        out.update({f"layers.{i}.ffn.shared_experts.{a}": f"{p}.{module}.{b}" for a, b in SWIGLU.items()})
        out[f"layers.{i}.ffn.shared_expert_gate.weight"] = f"{p}.shared_expert_gate.weight"
    return out


def selection_bias_name(fam: Family, fused: bool) -> str:
    """The selection bias in the MoE block: ``Family.selection_bias_name`` [E] (on the router or on the block),
    or ERNIE 4.5's [1, E] ``moe_statics.e_score_correction_bias`` (``gate.moe_statics...`` under transformers 5's
    in-memory names: ``Family.statics_bias``)."""
    if fam.statics_bias:
        return ("gate." if fused else "") + "moe_statics.e_score_correction_bias"
    return fam.selection_bias_name


GPT_OSS_EXPERTS = {"gate_up_proj": "gate_up", "gate_up_proj_bias": "gate_up_bias", "down_proj": "down",
                   "down_proj_bias": None}
"""gpt-oss's expert tensors (the same names on both sides, ``layers.{i}.ffn.experts.X`` /
``model.layers.{i}.mlp.experts.X``) -> the stem of their ``gpt_oss_experts.TRANSFORMS`` (``{stem}_in`` /
``{stem}_out``); None: copied as is."""


def gpt_oss_expert_names(i: int) -> dict[str, str]:
    """ours -> theirs for layer ``i``'s routed-expert tensors in the 'gpt_oss' layout."""
    return {f"layers.{i}.ffn.experts.{n}": f"model.layers.{i}.mlp.experts.{n}" for n in GPT_OSS_EXPERTS}


def mtp_renames(fam: Family, n_layers: int, k: int, kind: str, fused: bool) -> dict[str, str]:
    """ours -> theirs for multi-token-prediction depth ``k`` (its block of ``kind``), stored as decoder layer
    ``n_layers + k``: ``mtp.{k}.block.attn...`` -> ``model.layers.{n_layers + k}.self_attn...``.  Its routed
    experts: ``mtp_stacked_name`` / ``expert_name`` of layer ``n_layers + k``."""
    i = n_layers + k
    out = {f"mtp.{k}.{a}": f"model.layers.{i}.{b}" for a, b in MTP.items()}
    for ours, theirs in layer_renames(fam, i, kind, fused).items():
        out[f"mtp.{k}.block." + ours.removeprefix(f"layers.{i}.")] = theirs
    return out


def mtp_stacked_name(k: int, part: str) -> str:
    """Our stacked tensor holding ``part`` of multi-token-prediction depth ``k``'s routed experts."""
    return f"mtp.{k}.block.ffn.experts.{STACKED[part]}"


def renames(fam: Family, kinds: list[str], fused: bool) -> dict[str, str]:
    """ours -> theirs for every one-to-one tensor of a model whose layers are ``kinds``."""
    out = dict(GLOBAL)
    for i, kind in enumerate(kinds):
        out.update(layer_renames(fam, i, kind, fused))
    return out
