"""export-hf: a sparselm model -> the Hugging Face family that computes the same function.

The target is chosen from the model (``choose_family``): each family of ``hf_families`` lists what of a
sparselm config it cannot express (``blockers``); the first family, in a fixed preference order, that can
express everything is written.  When none can, the refusal names, for the closest family, each feature it
lacks.  Routed experts are written one tensor per expert, as published checkpoints and ``save_pretrained``
hold them (Mixtral ``block_sparse_moe.experts.{e}.w1/w3/w2``, the others ``mlp.experts.{e}.gate_proj/...``),
or, with ``fused=True``, under transformers 5's in-memory names (``mlp.experts.gate_up_proj``).
"""
from __future__ import annotations

from sparselm.convert import hf_families as fam
from sparselm.errors import ConversionError

DENSE_ORDER = ("llama", "mistral", "qwen2", "qwen3")
MOE_ORDER = ("mixtral", "qwen3_moe", "qwen2_moe", "olmoe", "glm4_moe")


def blockers(family: str, cfg) -> list[str]:
    """The features of ``cfg`` that ``family`` cannot express (empty: it computes the same function)."""
    m, e = cfg.model, cfg.moe
    kinds = m.layer_kinds()
    out = []
    other = sorted(set(kinds) - {"dense", "moe"})
    if other:
        out.append(f"model.pattern has {', '.join(other)} layers (no Hugging Face equivalent)")
    if cfg.attention.pattern != "causal" or cfg.attention.persistent_slots:
        out.append(f"attention.pattern={cfg.attention.pattern} / persistent memory (sparse attention)")
    moe = "moe" in kinds
    if moe != (family in fam.MOE):
        out.append("MoE layers" if moe else "no MoE layers")
        return out
    sliding = [m.layer_window(i) > 0 for i in range(m.n_layers)]
    if any(sliding):
        if family in ("llama", "olmoe", "glm4_moe"):
            out.append("model.attention_layers with sliding layers")
        elif family in ("mistral", "mixtral", "qwen3_moe") and not all(sliding):
            out.append("sliding windows in some layers only (this family slides in all or none)")
    if m.rotary_fraction != 1 and family != "glm4_moe":
        out.append(f"model.rotary_fraction={m.rotary_fraction}")
    qkv_bias_ok = family in ("qwen2", "qwen2_moe", "glm4_moe")
    if m.qkv_bias and not qkv_bias_ok:
        out.append("model.qkv_bias=true")
    if family == "qwen2" and not m.qkv_bias:
        out.append("model.qkv_bias=false (qwen2 always has q/k/v biases)")
    norm = {"qwen3": "per_head", "qwen3_moe": "per_head", "olmoe": "full"}.get(family, "none")
    if family == "glm4_moe" and m.qk_norm in ("none", "per_head"):
        norm = m.qk_norm
    if m.qk_norm != norm:
        out.append(f"model.qk_norm={m.qk_norm}")
    if m.clip_qkv and family != "olmoe":
        out.append(f"model.clip_qkv={m.clip_qkv}")
    if not moe:
        return out
    if e.drop_tokens:
        out.append("moe.drop_tokens=true (transformers' MoE blocks are dropless)")
    want_score = "sigmoid" if family == "glm4_moe" else "softmax"
    if e.score_func != want_score:
        out.append(f"moe.score_func={e.score_func}")
    if e.bias_balancing != (family == "glm4_moe"):
        out.append(f"moe.bias_balancing={str(e.bias_balancing).lower()}")
    if family != "glm4_moe" and (e.n_group > 1 or e.routed_scaling_factor != 1):
        out.append("group-limited routing / moe.routed_scaling_factor")
    if family == "qwen2_moe":
        if not (e.num_shared_experts and e.shared_expert_gate):
            out.append("no gated shared expert (qwen2_moe has one)")
    elif e.shared_expert_gate:
        out.append("moe.shared_expert_gate=true")
    elif e.num_shared_experts and family != "glm4_moe":
        out.append(f"moe.num_shared_experts={e.num_shared_experts}")
    if family == "glm4_moe" and not e.num_shared_experts:
        out.append("moe.num_shared_experts=0 (glm4_moe has shared experts)")
    if family == "mixtral" and not e.renormalize:
        out.append("moe.renormalize=false")
    dense_layers = [i for i, k in enumerate(kinds) if k == "dense"]
    if family in ("mixtral", "olmoe") and dense_layers:
        out.append("dense layers among the MoE layers")
    if family == "glm4_moe" and dense_layers != list(range(len(dense_layers))):
        out.append("dense layers after the first MoE layer (glm4_moe: only the first layers)")
    return out


def choose_family(cfg) -> str:
    """The first family (dense: llama, mistral, qwen2, qwen3; MoE: mixtral, qwen3_moe, qwen2_moe, olmoe,
    glm4_moe) that expresses ``cfg``; ConversionError naming what the closest one lacks otherwise."""
    order = MOE_ORDER if "moe" in cfg.model.layer_kinds() else DENSE_ORDER
    found = {f: blockers(f, cfg) for f in order}
    for family, problems in found.items():
        if not problems:
            return family
    closest = min(order, key=lambda f: len(found[f]))
    raise ConversionError(f"no Hugging Face family computes this model; the closest, {closest}, cannot express: "
                          + "; ".join(found[closest]) + ". Use `consolidate` for a sparselm checkpoint instead")


def generation_config(eod_id: int) -> dict:
    """generation_config.json: transformers' generate stops at our end-of-document token and pads with it (no
    beginning-of-sequence token: sparselm prepends none)."""
    return {"bos_token_id": None, "eos_token_id": eod_id, "pad_token_id": eod_id}


def hf_config(family: str, cfg, eod_id: int) -> dict:
    """config.json for ``family`` (transformers 5 keys)."""
    from sparselm.model.moe.config import resolved_expert_hidden

    m, e = cfg.model, cfg.moe
    rope = {"rope_type": "default" if m.rope_scaling == "none" else m.rope_scaling, "rope_theta": m.rope_theta}
    if m.rope_scaling != "none":
        rope["factor"] = m.rope_factor
    if m.rope_scaling in ("llama3", "yarn"):
        rope["original_max_position_embeddings"] = m.rope_original_max_seq_len
    if m.rope_scaling == "llama3":
        rope.update(low_freq_factor=m.rope_low_freq_factor, high_freq_factor=m.rope_high_freq_factor)
    if m.rope_scaling == "yarn":
        rope.update(beta_fast=m.rope_beta_fast, beta_slow=m.rope_beta_slow, truncate=m.rope_truncate,
                    attention_factor=m.rope_attention_factor or None)
    if m.rotary_fraction != 1:
        rope["partial_rotary_factor"] = m.rotary_fraction
    out = {"architectures": [fam.ARCHITECTURES[family]], "model_type": family, "bos_token_id": None,
           "eos_token_id": eod_id, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
           "head_dim": m.head_width, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu", "tie_word_embeddings": m.tie_embeddings, "rope_parameters": rope,
           "intermediate_size": m.ffn_hidden, "attention_bias": False, "dtype": "float32"}
    sliding = [m.layer_window(i) > 0 for i in range(m.n_layers)]
    window = m.sliding_window if any(sliding) else None
    if family in ("qwen2", "qwen3", "qwen2_moe"):
        out.update(use_sliding_window=window is not None, sliding_window=window, max_window_layers=m.n_layers,
                   layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
    elif family in ("mistral", "mixtral", "qwen3_moe"):
        out["sliding_window"] = window
        if family == "qwen3_moe":  # transformers drops the window unless use_sliding_window
            out["use_sliding_window"] = window is not None
    if family == "qwen2_moe":
        out["qkv_bias"] = m.qkv_bias
    if family == "glm4_moe":
        out["attention_bias"] = m.qkv_bias
    if family not in fam.MOE:
        return out
    hidden = resolved_expert_hidden(cfg)
    kinds = m.layer_kinds()
    out.update(num_experts_per_tok=e.top_k, norm_topk_prob=e.renormalize, router_aux_loss_coef=e.aux_loss_coef,
               output_router_logits=False)
    if family == "mixtral":
        out.update(num_local_experts=e.num_experts, intermediate_size=hidden, router_jitter_noise=0.0)
    elif family == "olmoe":
        out.update(num_experts=e.num_experts, intermediate_size=hidden, clip_qkv=m.clip_qkv or None)
    elif family in ("qwen2_moe", "qwen3_moe"):
        out.update(num_experts=e.num_experts, moe_intermediate_size=hidden, decoder_sparse_step=1,
                   mlp_only_layers=[i for i, k in enumerate(kinds) if k == "dense"])
        if family == "qwen2_moe":
            out["shared_expert_intermediate_size"] = e.num_shared_experts * hidden
    else:  # glm4_moe
        out.update(n_routed_experts=e.num_experts, moe_intermediate_size=hidden, n_shared_experts=e.num_shared_experts,
                   n_group=e.n_group, topk_group=e.topk_group, routed_scaling_factor=e.routed_scaling_factor,
                   first_k_dense_replace=kinds.count("dense"), use_qk_norm=m.qk_norm == "per_head",
                   num_nextn_predict_layers=0)
    return out


def hf_tensor_plan(family: str, cfg, names, fused: bool) -> dict:
    """HF name -> (our name, how): 'copy', or ('expert', e, 'gate' | 'up' | 'down') for one expert's slice of
    our fused tensors; only names in ``names`` (the checkpoint's tensors) are planned."""
    m = cfg.model
    plan = {}
    ours_present = set(names)
    for ours, theirs in fam.GLOBAL.items():
        if ours in ours_present and not (ours == "head.proj.weight" and m.tie_embeddings):
            plan[theirs] = (ours, "copy")
    for i, kind in enumerate(m.layer_kinds()):
        for ours, theirs in fam.layer_renames(family, i, kind, fused).items():
            if ours in ours_present:
                plan[theirs] = (ours, "copy")
        if kind != "moe":
            continue
        gate_up, down = f"layers.{i}.ffn.experts.gate_up_proj", f"layers.{i}.ffn.experts.down_proj"
        if fused:
            plan[f"model.layers.{i}.mlp.experts.gate_up_proj"] = (gate_up, "copy")
            plan[f"model.layers.{i}.mlp.experts.down_proj"] = (down, "copy")
            continue
        for x in range(cfg.moe.num_experts):
            g, u, d = fam.expert_names(family, i, x)
            plan[g], plan[u], plan[d] = (gate_up, ("gate", x)), (gate_up, ("up", x)), (down, ("down", x))
    return plan


def expert_slice(tensor, how):
    """One expert's gate, up or down weight out of our fused [E, 2H, D] / [E, D, H] tensor."""
    part, x = how
    if part == "down":
        return tensor[x]
    h = tensor.shape[1] // 2
    return tensor[x, :h] if part == "gate" else tensor[x, h:]
