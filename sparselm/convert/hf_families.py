"""The Hugging Face decoder families sparselm reads and writes, as transformers 5 defines them.

One table (``FAMILIES``) says, per ``model_type``, how its config.json maps onto sparselm's config and how its
tensors are named.  Every family is a pre-norm Llama-style decoder (RMSNorm, rotate-half rotary, SwiGLU); they
differ in attention options (q/k/v biases, q/k norms, clipping, head width, partial or scaled rotary, sliding
windows) and in the MoE block (router scores, shared experts and their gate, group-limited routing, dense
first layers).  ``sparselm_config(hf)`` refuses, naming the field, its value and what is supported, anything
sparselm would compute differently; it reads only config.json, so nothing is written before the refusal.
"""
from __future__ import annotations

import math

from sparselm.errors import ConversionError

DENSE = ("llama", "mistral", "qwen2", "qwen3")
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe")
FAMILIES = DENSE + MOE
ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM", "glm4_moe": "Glm4MoeForCausalLM"}
# Families left out on purpose, with what sparselm lacks.
KNOWN_UNSUPPORTED = {
    "deepseek_v2": "multi-head latent attention (MLA)", "deepseek_v3": "multi-head latent attention (MLA)",
    "gpt_oss": "attention sinks, a clamped SwiGLU and biased experts", "kimi_k2": "multi-head latent attention (MLA)",
}
SUPPORTED = ", ".join(FAMILIES)


def _problem(field: str, value, supported: str) -> str:
    return f"{field}={value!r} (supported: {supported})"


def hf_rope(hf: dict) -> dict:
    """The rotary settings of a Hugging Face config, read with transformers' precedence: a non-empty
    ``rope_scaling`` (the 4.x spelling) replaces ``rope_parameters``; theta and partial_rotary_factor come from
    that dict, else from the top level.  Returns the dict with 'rope_type', 'rope_theta', 'partial_rotary_factor'
    and '_key' (where the settings came from)."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ConversionError(f"config.json has {key}={params!r}, which is not a dict of rotary settings")
    out = dict(params)
    out["rope_type"] = params.get("rope_type", params.get("type", "default"))
    out["rope_theta"] = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    out["partial_rotary_factor"] = 1.0 if partial is None else float(partial)
    out["_key"] = key
    return out


def _rope_overrides(hf: dict, problems: list) -> dict:
    rope = hf_rope(hf)
    kind, key = rope["rope_type"], rope["_key"]
    out = {"rope_theta": rope["rope_theta"], "rotary_fraction": rope["partial_rotary_factor"]}
    if kind == "default":
        return out
    if kind not in ("linear", "llama3", "yarn"):
        problems.append(_problem(f"{key}.rope_type", kind, "default, linear, llama3, yarn"))
        return out
    factor = rope.get("factor")
    original = rope.get("original_max_position_embeddings")
    if kind in ("llama3", "yarn"):  # transformers' standardize_rope_params: the top-level field wins, else max length
        original = hf.get("original_max_position_embeddings") or original or hf.get("max_position_embeddings")
    if kind == "yarn" and factor is None and original:
        factor = hf["max_position_embeddings"] / original
    out.update(rope_scaling=kind, rope_factor=float(factor if factor is not None else 1.0))
    if kind in ("llama3", "yarn"):
        if not original:
            problems.append(_problem(f"{key}.original_max_position_embeddings", original, "a positive length"))
        out["rope_original_max_seq_len"] = int(original or 0)
    if kind == "llama3":
        out.update(rope_low_freq_factor=float(rope["low_freq_factor"]), rope_high_freq_factor=float(rope["high_freq_factor"]))
    if kind == "yarn":
        f = out["rope_factor"]
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        attention = rope.get("attention_factor")
        if attention is None and rope.get("mscale") and rope.get("mscale_all_dim"):
            attention = mscale(f, rope["mscale"]) / mscale(f, rope["mscale_all_dim"])
        out.update(rope_beta_fast=float(rope.get("beta_fast") or 32), rope_beta_slow=float(rope.get("beta_slow") or 1),
                   rope_attention_factor=float(attention if attention is not None else mscale(f)),
                   rope_truncate=bool(rope.get("truncate", True)))
    return out


def _attention_overrides(hf: dict, family: str, problems: list) -> dict:
    out = {}
    if family == "qwen2":
        out["qkv_bias"] = True
    elif family == "qwen2_moe":
        out["qkv_bias"] = bool(hf.get("qkv_bias", True))
    elif family == "glm4_moe":
        out["qkv_bias"] = bool(hf.get("attention_bias", False))
    elif hf.get("attention_bias"):
        problems.append(_problem("attention_bias", True, "false: this family's attention_bias also puts a bias on "
                                 "o_proj, which sparselm does not have"))
    if family in ("qwen3", "qwen3_moe") or (family == "glm4_moe" and hf.get("use_qk_norm")):
        out["qk_norm"] = "per_head"
    if family == "olmoe":
        out["qk_norm"] = "full"
        out["clip_qkv"] = float(hf.get("clip_qkv") or 0.0)
    window = hf.get("sliding_window")
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not hf.get("use_sliding_window"):
        window = None  # transformers drops the window unless use_sliding_window (published configs keep one)
    types = hf.get("layer_types")
    if family in ("qwen2", "qwen3", "qwen2_moe") and window:
        if not types:  # a config.json older than layer_types: the types transformers derives
            n, first = hf["num_hidden_layers"], hf.get("max_window_layers", 28)
            slides = [(i + 1) % 2 and i < first if family == "qwen2_moe" else i >= first for i in range(n)]
            types = ["sliding_attention" if s else "full_attention" for s in slides]
        layers = ["sliding" if t == "sliding_attention" else "full" for t in types]
        if "sliding" in layers:
            out.update(sliding_window=int(window), attention_layers=layers)
    elif family in ("mistral", "mixtral", "qwen3_moe") and window:
        out.update(sliding_window=int(window), attention_layers=["sliding"])
    return out


def _moe(hf: dict, family: str, problems: list) -> tuple[dict, list[str]]:
    """(moe section, block kind of every layer)."""
    n = hf["num_hidden_layers"]
    experts = hf.get("num_local_experts") or hf.get("num_experts") or hf.get("n_routed_experts")
    moe = {"num_experts": int(experts), "top_k": int(hf["num_experts_per_tok"]), "drop_tokens": False,
           "noisy_gating": False, "z_loss_coef": 0.0, "score_func": "softmax", "bias_balancing": False,
           "num_shared_experts": 0, "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.0) or 0.0)}
    kinds = ["moe"] * n
    if family == "mixtral":
        moe.update(renormalize=True, expert_hidden=hf["intermediate_size"])
        return moe, kinds
    moe.update(renormalize=bool(hf.get("norm_topk_prob", False)), expert_hidden=hf.get("moe_intermediate_size") or hf["intermediate_size"])
    if family in ("qwen2_moe", "qwen3_moe"):
        step, dense_only = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or [])
        kinds = ["moe" if i not in dense_only and (i + 1) % step == 0 else "dense" for i in range(n)]
    if family == "qwen2_moe":
        shared = hf.get("shared_expert_intermediate_size") or 0
        if shared % hf["moe_intermediate_size"]:
            problems.append(_problem("shared_expert_intermediate_size", shared,
                                     f"a multiple of moe_intermediate_size={hf['moe_intermediate_size']}"))
        moe.update(num_shared_experts=shared // hf["moe_intermediate_size"], shared_expert_gate=shared > 0)
    if family == "glm4_moe":
        kinds = ["dense" if i < hf.get("first_k_dense_replace", 0) else "moe" for i in range(n)]
        moe.update(score_func="sigmoid", bias_balancing=True, num_shared_experts=int(hf.get("n_shared_experts") or 0),
                   n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
                   routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)))
    return moe, kinds


def sparselm_config(hf: dict) -> dict:
    """config.json of a supported family -> sparselm config overrides {'model': ..., 'moe': ...}; raises
    ConversionError with one line naming every field sparselm cannot compute as transformers does."""
    family = hf.get("model_type")
    if family in KNOWN_UNSUPPORTED:
        raise ConversionError(f"model_type={family!r} is not supported ({KNOWN_UNSUPPORTED[family]}); import-hf "
                              f"reads {SUPPORTED}")
    if family not in FAMILIES:
        raise ConversionError(f"model_type={family!r} is not supported; import-hf reads {SUPPORTED}")
    problems = []
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in (None, "silu", "swish"):
        problems.append(_problem("hidden_act", act, "silu (SwiGLU)"))
    if hf.get("quantization_config"):
        method = (hf["quantization_config"] or {}).get("quant_method", "?")
        problems.append(_problem("quantization_config.quant_method", method, "unquantized fp32/bf16/fp16 weights; "
                                 "dequantize and save_pretrained them first"))
    if hf.get("mlp_bias"):
        problems.append(_problem("mlp_bias", True, "false"))
    model = {"d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
             "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
             "d_ff": hf.get("intermediate_size") or 0, "vocab_size": hf["vocab_size"], "pad_vocab_to": 1,
             "max_seq_len": hf.get("max_position_embeddings", 2048), "norm_eps": hf.get("rms_norm_eps", 1e-6),
             "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
    if hf.get("head_dim"):
        model["head_dim"] = int(hf["head_dim"])
    model.update(_rope_overrides(hf, problems))
    model.update(_attention_overrides(hf, family, problems))
    out = {"model": model}
    if family in MOE:
        moe, kinds = _moe(hf, family, problems)
        out["moe"], model["pattern"] = moe, kinds
    else:
        model["pattern"] = ["dense"]
    if problems:
        raise ConversionError(f"{family} model cannot be imported without changing what it computes: "
                              + "; ".join(problems))
    return out


# ------------------------------------------------------------------------------------------------ names
GLOBAL = {"embed.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight",
          "head.proj.weight": "lm_head.weight"}
ATTENTION = {"input_norm.weight": "input_layernorm.weight", "post_attn_norm.weight": "post_attention_layernorm.weight",
             "attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
             "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.o_proj.weight": "self_attn.o_proj.weight",
             "attn.q_proj.bias": "self_attn.q_proj.bias", "attn.k_proj.bias": "self_attn.k_proj.bias",
             "attn.v_proj.bias": "self_attn.v_proj.bias", "attn.q_norm.weight": "self_attn.q_norm.weight",
             "attn.k_norm.weight": "self_attn.k_norm.weight"}
SWIGLU = {"gate_proj.weight": "gate_proj.weight", "up_proj.weight": "up_proj.weight", "down_proj.weight": "down_proj.weight"}


def moe_prefix(family: str, fused: bool) -> str:
    """The MoE block's module name in a layer: Mixtral's published per-expert layout says block_sparse_moe."""
    return "block_sparse_moe" if family == "mixtral" and not fused else "mlp"


def expert_names(family: str, i: int, e: int) -> tuple[str, str, str]:
    """(gate, up, down) per-expert names of expert ``e`` of layer ``i``, as published checkpoints hold them."""
    if family == "mixtral":
        p = f"model.layers.{i}.block_sparse_moe.experts.{e}"
        return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"
    p = f"model.layers.{i}.mlp.experts.{e}"
    return f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight"


def layer_renames(family: str, i: int, kind: str, fused: bool) -> dict[str, str]:
    """ours -> theirs for the one-to-one tensors of layer ``i`` (attention, norms, dense MLP, router, shared
    experts); the routed experts are built by ``expert_names`` (per expert) or named fused."""
    out = {f"layers.{i}.{a}": f"model.layers.{i}.{b}" for a, b in ATTENTION.items()}
    if kind == "dense":
        out.update({f"layers.{i}.ffn.{a}": f"model.layers.{i}.mlp.{b}" for a, b in SWIGLU.items()})
        return out
    p = f"model.layers.{i}.{moe_prefix(family, fused)}"
    out[f"layers.{i}.ffn.router.weight"] = f"{p}.gate.weight"
    out[f"layers.{i}.ffn.router.expert_bias"] = f"{p}.gate.e_score_correction_bias"
    shared = {"qwen2_moe": "shared_expert", "glm4_moe": "shared_experts"}.get(family)
    if shared:
        out.update({f"layers.{i}.ffn.shared_experts.{a}": f"{p}.{shared}.{b}" for a, b in SWIGLU.items()})
        out[f"layers.{i}.ffn.shared_expert_gate.weight"] = f"{p}.shared_expert_gate.weight"
    return out
