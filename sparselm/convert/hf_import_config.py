"""import-hf's config mapping: a Hugging Face config.json -> sparselm config overrides, read off the family's
``Family`` record.

``sparselm_config(hf)`` refuses, naming the field, its value and what is supported, anything sparselm would
compute differently from transformers 5; it reads only config.json, so nothing is written before the refusal.
"""
from __future__ import annotations

from sparselm.convert.hf_families import family as family_of
from sparselm.convert.hf_family import Family, interval_placement
from sparselm.convert.hf_rope import hf_rope, rope_overrides
from sparselm.convert.refusal import unsupported
from sparselm.errors import ConversionError


def attention_overrides(hf: dict, fam: Family, problems: list[str]) -> dict:
    """sparselm ``model`` overrides for q/k/v and o biases, sinks, q/k norms, clipping and sliding windows of ``fam``."""
    out = {"attention_sinks": fam.attention_sinks}
    if fam.o_bias_key:
        out["o_bias"] = bool(hf.get(fam.o_bias_key, fam.qkv_bias))
    if fam.qkv_bias_key:
        out["qkv_bias"] = bool(hf.get(fam.qkv_bias_key, fam.qkv_bias))
    elif fam.qkv_bias:
        out["qkv_bias"] = True
    # a family without either key ignores attention_bias, as transformers builds it
    if fam.qk_norm != "none" and (fam.qk_norm_key is None or hf.get(fam.qk_norm_key)):
        out["qk_norm"] = fam.qk_norm
    if fam.clip_qkv:
        out["clip_qkv"] = float(hf.get("clip_qkv") or 0.0)
    window = hf.get("sliding_window")
    if fam.window_switch and not hf.get("use_sliding_window"):
        window = None  # transformers drops the window unless use_sliding_window (published configs keep one)
    if fam.window == "per_layer" and window:
        types = hf.get("layer_types")
        if not types:  # a config.json older than layer_types: the types transformers derives
            first = hf.get("max_window_layers", 28)
            slides = [fam.legacy_window_layers(i, first) for i in range(hf["num_hidden_layers"])]
            types = ["sliding_attention" if s else "full_attention" for s in slides]
        layers = ["sliding" if t == "sliding_attention" else "full" for t in types]
        if "sliding" in layers:
            out.update(sliding_window=int(window), attention_layers=layers)
    elif fam.window == "all" and window:
        out.update(sliding_window=int(window), attention_layers=["sliding"])
    return out


def legacy_rotary_fraction(hf: dict, problems: list[str]) -> dict:
    """``rotary_fraction`` from the legacy ``rotary_dim`` (channels rotated per head) where config.json gives no
    ``partial_rotary_factor`` (in its rotary dict or at the top level), as transformers' ``MiniMaxM2Config`` reads
    it; empty otherwise.  An odd ``rotary_dim`` is refused: transformers then rotates one channel more, at
    frequencies spaced for ``rotary_dim``, which sparselm does not compute."""
    rope = hf_rope(hf)
    given = (hf.get(rope["_key"]) or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    rotary_dim = hf.get("rotary_dim")
    if rotary_dim is None or given is not None:
        return {}
    head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    if rotary_dim % 2 or not 0 < rotary_dim <= head:
        problems.append(unsupported("rotary_dim", rotary_dim, f"an even number of channels up to head_dim={head}"))
        return {}
    return {"rotary_fraction": rotary_dim / head}


def mla_overrides(hf: dict, fam: Family, problems: list[str]) -> dict:
    """sparselm ``model`` overrides of an MLA family's attention (``Family.mla``): the latent widths, interleaved
    rope, yarn's ``mscale_all_dim`` (folded into the softmax scale) and the multi-token-prediction layers the
    config names (``import_hf`` keeps them only when the checkpoint holds them)."""
    rope = hf_rope(hf)
    missing = [k for k in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim") if hf.get(k) is None]
    if missing:
        problems.append(unsupported(missing[0], None, "the latent widths of multi-head latent attention; this "
                                    "config.json lacks " + ", ".join(missing)))
        return {}
    out = {"attention": "mla", "q_lora_rank": int(hf.get("q_lora_rank") or 0), "kv_lora_rank": int(hf["kv_lora_rank"]),
           "qk_nope_head_dim": int(hf["qk_nope_head_dim"]), "qk_rope_head_dim": int(hf["qk_rope_head_dim"]),
           "v_head_dim": int(hf["v_head_dim"]),
           "rope_interleave": bool(hf.get(fam.rope_interleave_key, True)) if fam.rope_interleave_key else True,
           "n_kv_heads": 0, "head_dim": 0, "latent_norm_eps": 1e-6}
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        out["mscale_all_dim"] = float(rope["mscale_all_dim"])
    if rope["partial_rotary_factor"] != 1:
        problems.append(unsupported("partial_rotary_factor", rope["partial_rotary_factor"], "1.0 (MLA rotates "
                                    "qk_rope_head_dim channels)"))
    return out


def interleaved_rope_overrides(hf: dict, problems: list[str]) -> dict:
    """sparselm ``model`` overrides of a family whose rope pairs are interleaved over the whole head
    (``Family.interleaved_rope``, ERNIE 4.5): ``rope_interleave``, and the whole head rotated, as transformers'
    default rope does whatever ``partial_rotary_factor`` says; a scaled rope with a factor < 1 is refused (its
    tables would be narrower than the heads transformers rotates)."""
    rope = hf_rope(hf)
    if rope["rope_type"] != "default" and rope["partial_rotary_factor"] != 1:
        problems.append(unsupported("partial_rotary_factor", rope["partial_rotary_factor"], "1.0 (this family "
                                    "rotates whole heads)"))
    return {"rope_interleave": True, "rotary_fraction": 1.0}


def layer_kinds(hf: dict, fam: Family) -> list[str]:
    """'dense' or 'moe', per layer, of an MoE family's config.json (``Family.dense_layers``)."""
    n = hf["num_hidden_layers"]
    if fam.dense_layers == "listed":
        step, dense_only = hf.get("decoder_sparse_step", 1) or 1, set(hf.get("mlp_only_layers") or [])
        return ["moe" if i not in dense_only and (i + 1) % step == 0 else "dense" for i in range(n)]
    if fam.dense_layers == "first":
        return ["dense" if i < hf.get("first_k_dense_replace", 0) else "moe" for i in range(n)]
    if fam.dense_layers == "types":  # transformers' default: the first layer dense
        return ["moe" if t == "sparse" else "dense" for t in hf.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1)]
    if fam.dense_layers == "interval":  # Ernie4_5_MoeConfig's defaults: start 1, end -1 (the last layer), interval 1
        start, end, interval = (hf.get(f"moe_layer_{k}") for k in ("start_index", "end_index", "interval"))
        moe = interval_placement(n, 1 if start is None else int(start), -1 if end is None else int(end),
                                 int(interval or 1))
        return ["moe" if m else "dense" for m in moe]
    return ["moe"] * n


def moe_overrides(hf: dict, fam: Family, problems: list[str]) -> dict:
    """sparselm ``moe`` section of an MoE family's config.json: routed experts, router, shared experts."""
    experts = (hf.get(fam.experts_key) or hf.get("num_local_experts") or hf.get("num_experts")
               or hf.get("n_routed_experts"))
    *optional, required = fam.expert_hidden_reads
    hidden = next((hf[k] for k in optional if hf.get(k)), None) or hf[required]
    renormalize = True if fam.renormalize_key is None else bool(hf.get(fam.renormalize_key, False))
    renormalize = renormalize and not fam.never_renormalize
    top_k = hf.get(fam.top_k_key) or hf["num_experts_per_tok"]
    moe = {"num_experts": int(experts), "top_k": int(top_k), "drop_tokens": False, "noisy_gating": False,
           "z_loss_coef": 0.0, "score_func": fam.score_func, "bias_balancing": fam.selection_bias,
           "num_shared_experts": 0, "aux_loss_coef": float(hf.get("router_aux_loss_coef", 0.0) or 0.0),
           "renormalize": renormalize, "expert_hidden": hidden}
    shared = fam.shared_experts
    if shared and shared.key_is_width:  # their total width: in routed experts' widths, else one of that width
        width, unit = hf.get(shared.key) or 0, hf[fam.expert_hidden_key]
        if width % unit:
            moe.update(num_shared_experts=1, shared_expert_hidden=int(width))
        else:
            moe["num_shared_experts"] = width // unit
    elif shared:
        width = moe["num_shared_experts"] = int(hf.get(shared.key) or 0)
    if shared and shared.gated:
        moe["shared_expert_gate"] = width > 0
    if fam.renormalize_min_key and float(hf.get(fam.renormalize_min_key) or 0.0) > 1e-12:
        problems.append(unsupported(fam.renormalize_min_key, hf[fam.renormalize_min_key], "at most 1e-12 (sparselm "
                                    "clamps the top-k weights' sum at the smallest normal float before renormalising)"))
    if fam.router_bias:
        moe["router_bias"] = True
    if fam.expert_layout == "gpt_oss":
        moe["expert_biases"] = True
    if fam.clamped_swiglu:  # transformers' GptOssConfig defaults
        moe.update(swiglu_limit=float(hf.get("swiglu_limit", 7.0)), swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
                   swiglu_up_offset=1.0)
        if not moe["swiglu_limit"] > 0:
            problems.append(unsupported("swiglu_limit", hf.get("swiglu_limit"), "a positive limit"))
    if fam.group_routing:
        moe.update(n_group=int(hf.get("n_group") or 1), topk_group=int(hf.get("topk_group") or 1),
                   routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)), group_score=fam.group_score)
    if fam.group_score == "max":  # DeepSeek-V2: groups only with topk_method group_limited_greedy
        method = hf.get("topk_method", "greedy")
        if method not in ("greedy", "group_limited_greedy"):
            problems.append(unsupported("topk_method", method, "greedy, group_limited_greedy"))
        if method != "group_limited_greedy":
            moe.update(n_group=1, topk_group=1)
    return moe


def with_defaults(hf: dict) -> dict:
    """config.json ``hf`` with the entries it leaves out that its family's transformers config class fills with
    other values than import's Llama-style fallbacks (``Family.config_defaults``); ConversionError for an
    unsupported ``model_type``."""
    return {**dict(family_of(hf.get("model_type")).config_defaults), **hf}


def is_block_fp8(quant: dict) -> bool:
    """``quantization_config`` is block-scaled fp8 e4m3 (DeepSeek-V3's: ``weight_scale_inv`` per block of
    ``weight_block_size``), which import dequantizes tensor by tensor."""
    block = quant.get("weight_block_size")
    return (quant.get("quant_method") == "fp8" and quant.get("fmt", "e4m3") == "e4m3"
            and isinstance(block, (list, tuple)) and len(block) == 2 and all(int(b) > 0 for b in block))


class ConfigJson(dict):
    """config.json as import reads it: a size it lacks raises ConversionError naming the key (a lookup of a
    key with a default goes through ``get``)."""

    def __missing__(self, key):
        raise ConversionError(f"config.json of this {self.get('model_type')} model has no '{key}': import-hf reads "
                              "the model's sizes from config.json, never defaults them; add it")


def sparselm_config(hf: dict) -> dict:
    """config.json of a supported family -> sparselm config overrides {'model': ..., 'moe': ...}; raises
    ConversionError with one line naming every field sparselm cannot compute as transformers does, a size
    config.json lacks (the model's sizes are read, never defaulted), or the unsupported ``model_type``."""
    fam = family_of(hf.get("model_type"))
    hf = ConfigJson(with_defaults(hf))
    problems = []
    act = hf.get("hidden_act", hf.get("hidden_activation", "silu"))
    if act not in (None, "silu", "swish"):
        problems.append(unsupported("hidden_act", act, "silu (SwiGLU)"))
    quant = hf.get("quantization_config") or {}
    method = quant.get("quant_method", "?")
    if quant and not is_block_fp8(quant) and not (fam.mxfp4 and method == "mxfp4"):
        problems.append(unsupported("quantization_config.quant_method", method,
                                    "unquantized fp32/bf16/fp16 weights, fp8 (e4m3, weight_block_size: "
                                    "DeepSeek-V3's, dequantized while streaming) or gpt_oss's mxfp4 experts; "
                                    "dequantize and save_pretrained others first"))
    if hf.get("mlp_bias"):
        problems.append(unsupported("mlp_bias", True, "false"))
    if fam.bias_key and hf.get(fam.bias_key):
        problems.append(unsupported(fam.bias_key, True, "false: it also biases the MLPs, the shared experts and "
                                    "lm_head, which sparselm does not have"))
    model = {"d_model": hf["hidden_size"], "n_layers": hf["num_hidden_layers"], "n_heads": hf["num_attention_heads"],
             "n_kv_heads": hf.get("num_key_value_heads") or hf["num_attention_heads"],
             "d_ff": hf.get("intermediate_size") or 0, "vocab_size": hf["vocab_size"], "pad_vocab_to": 1,
             "max_seq_len": hf.get("max_position_embeddings", 2048), "norm_eps": hf.get("rms_norm_eps", 1e-6),
             "tie_embeddings": bool(hf.get("tie_word_embeddings", False))}
    if hf.get("head_dim"):
        model["head_dim"] = int(hf["head_dim"])
    model.update(rope_overrides(hf, problems))
    if fam.legacy_rotary_dim:
        model.update(legacy_rotary_fraction(hf, problems))
    model.update(attention_overrides(hf, fam, problems))
    if fam.interleaved_rope:
        model.update(interleaved_rope_overrides(hf, problems))
    if fam.mla:
        mla = mla_overrides(hf, fam, problems)
        mscale = mla.pop("mscale_all_dim", None)
        model.update(mla)
        model.pop("rotary_fraction", None)
        if mscale is not None:
            model["rope"]["mscale_all_dim"] = mscale
    if fam.mtp_key:
        model["mtp_layers"] = int(hf.get(fam.mtp_key, hf.get("num_mtp_layers", 0)) or 0)
    model["hf_family"] = fam.name
    out = {"model": model}
    if fam.moe:
        out["moe"], model["pattern"] = moe_overrides(hf, fam, problems), layer_kinds(hf, fam)
    else:
        model["pattern"] = ["dense"]
    if problems:
        raise ConversionError(f"{fam.name} model cannot be imported without changing what it computes: "
                              + "; ".join(problems))
    return out
