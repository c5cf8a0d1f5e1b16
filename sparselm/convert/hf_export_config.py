"""export-hf's config side: which family expresses a sparselm model (``blockers``, ``choose_family``) and its
config.json (``hf_config``), both read off the ``Family`` records.

Each family lists what of a sparselm config it cannot express; the first family of ``FAMILIES`` (dense or MoE,
as the model is) that can express everything is written.  When none can, the refusal names, for the closest
family, each feature it lacks.
"""
from __future__ import annotations

from sparselm.convert.hf_families import ALIASES, BY_NAME, FAMILIES
from sparselm.convert.hf_family import Family, interval_fields
from sparselm.convert.hf_rope import rope_parameters
from sparselm.errors import ConversionError
from sparselm.model.moe.config import resolved_expert_hidden, resolved_shared_hidden


def attention_blockers(fam: Family, cfg) -> list[str]:
    """The attention features of ``cfg`` (windows, rotary fraction, q/k/v biases, q/k norm, clipping) that
    ``fam`` cannot express."""
    m = cfg.model
    out = []
    sliding = [m.layer_window(i) > 0 for i in range(m.n_layers)]
    if any(sliding):
        if fam.window == "none":
            out.append("model.attention_layers with sliding layers")
        elif fam.window == "all" and not all(sliding):
            out.append("sliding windows in some layers only (this family slides in all or none)")
    if m.rotary_fraction != 1 and not fam.partial_rotary:
        out.append(f"model.rotary_fraction={m.rotary_fraction}")
    if m.qkv_bias and not fam.allows_qkv_bias():
        out.append("model.qkv_bias=true")
    if fam.qkv_bias and fam.qkv_bias_key is None and not m.qkv_bias:
        out.append(f"model.qkv_bias=false ({fam.name} always has q/k/v biases)")
    if m.qk_norm not in fam.qk_norms():
        out.append(f"model.qk_norm={m.qk_norm}")
    if m.clip_qkv and not fam.clip_qkv:
        out.append(f"model.clip_qkv={m.clip_qkv}")
    if m.attention_sinks != fam.attention_sinks:
        out.append(f"model.attention_sinks={str(m.attention_sinks).lower()}")
    if fam.o_bias_key and m.o_bias != m.qkv_bias:
        out.append(f"model.o_bias={str(m.o_bias).lower()} with model.qkv_bias={str(m.qkv_bias).lower()} "
                   f"({fam.o_bias_key} biases q, k, v and o together)")
    elif m.o_bias and not fam.o_bias_key:
        out.append("model.o_bias=true")
    if (m.attention == "mla") != fam.mla:
        out.append("model.attention=mla" if m.attention == "mla" else f"model.attention={m.attention} ({fam.name}'s "
                   "attention is multi-head latent attention)")
    if m.rope_interleave and not (fam.mla or fam.interleaved_rope):
        out.append("model.rope_interleave=true")
    if fam.interleaved_rope and not m.rope_interleave:
        out.append(f"model.rope_interleave=false ({fam.name}'s rope pairs are always interleaved)")
    if fam.mla and not fam.rope_interleave_key and not m.rope_interleave:
        out.append(f"model.rope_interleave=false ({fam.name}'s rope pairs are always interleaved)")
    if fam.mla and m.latent_norm_eps != 1e-6:
        out.append(f"model.latent_norm_eps={m.latent_norm_eps} (transformers fixes the latent norms' at 1e-6)")
    return out


def moe_blockers(fam: Family, cfg) -> list[str]:
    """The MoE features of ``cfg`` (routing, shared experts, dense-layer placement) that MoE family ``fam``
    cannot express."""
    e, kinds = cfg.moe, cfg.model.layer_kinds()
    out = []
    if e.drop_tokens:
        out.append("moe.drop_tokens=true (transformers' MoE blocks are dropless)")
    if e.score_func != fam.score_func:
        out.append(f"moe.score_func={e.score_func}")
    if e.bias_balancing != fam.selection_bias:
        out.append(f"moe.bias_balancing={str(e.bias_balancing).lower()}")
    if not fam.group_routing and (e.n_group > 1 or e.routed_scaling_factor != 1):
        out.append("group-limited routing / moe.routed_scaling_factor")
    if fam.group_routing and e.n_group > 1 and e.group_score != fam.group_score:
        out.append(f"moe.group_score={e.group_score} ({fam.name} scores a group by {fam.group_score})")
    if fam.never_renormalize and e.renormalize:
        out.append(f"moe.renormalize=true ({fam.name} never renormalises the top-k weights)")
    shared = fam.shared_experts
    if shared and shared.gated:
        if not (e.num_shared_experts and e.shared_expert_gate):
            out.append(f"no gated shared expert ({fam.name} has one)")
    elif e.shared_expert_gate:
        out.append("moe.shared_expert_gate=true")
    elif e.num_shared_experts and not shared:
        out.append(f"moe.num_shared_experts={e.num_shared_experts}")
    if shared and not shared.gated and not shared.optional and not e.num_shared_experts:
        out.append(f"moe.num_shared_experts=0 ({fam.name} has shared experts)")
    if shared and not shared.key_is_width and resolved_shared_hidden(cfg) % resolved_expert_hidden(cfg):
        out.append(f"moe.shared_expert_hidden={e.shared_expert_hidden} ({fam.name}'s shared experts are "
                   f"{shared.key} x {fam.expert_hidden_key} wide)")
    if fam.renormalize_key is None and not e.renormalize:
        out.append("moe.renormalize=false")
    if e.router_bias != fam.router_bias:
        out.append(f"moe.router_bias={str(e.router_bias).lower()}")
    if e.expert_biases != (fam.expert_layout == "gpt_oss"):
        out.append(f"moe.expert_biases={str(e.expert_biases).lower()}")
    clamp = (e.swiglu_limit, e.swiglu_alpha, e.swiglu_up_offset)
    if fam.clamped_swiglu and not (e.swiglu_limit > 0 and e.swiglu_up_offset == 1):
        out.append(f"moe.swiglu_limit={e.swiglu_limit} / moe.swiglu_up_offset={e.swiglu_up_offset} ({fam.name} clamps "
                   "at a positive limit with an up offset of 1)")
    elif not fam.clamped_swiglu and clamp != (0.0, 1.0, 0.0):
        out.append("a clamped SwiGLU (moe.swiglu_limit / swiglu_alpha / swiglu_up_offset)")
    dense_layers = [i for i, k in enumerate(kinds) if k == "dense"]
    if fam.dense_layers == "none" and dense_layers:
        out.append("dense layers among the MoE layers")
    if fam.dense_layers == "first" and dense_layers != list(range(len(dense_layers))):
        out.append(f"dense layers after the first MoE layer ({fam.name}: only the first layers)")
    if fam.dense_layers == "interval" and interval_fields([k == "moe" for k in kinds]) is None:
        out.append(f"MoE layers {[i for i, k in enumerate(kinds) if k == 'moe']} ({fam.name} places them at every "
                   "moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index)")
    return out


def blockers(fam: Family, cfg) -> list[str]:
    """The features of ``cfg`` that ``fam`` cannot express, one clause each (empty: it computes the same
    function)."""
    kinds = cfg.model.layer_kinds()
    out = []
    other = sorted(set(kinds) - {"dense", "moe"})
    if other:
        out.append(f"model.pattern has {', '.join(other)} layers (no Hugging Face equivalent)")
    if cfg.attention.pattern != "causal" or cfg.attention.persistent_slots:
        out.append(f"attention.pattern={cfg.attention.pattern} / persistent memory (sparse attention)")
    moe = "moe" in kinds
    if moe != fam.moe:
        out.append("MoE layers" if moe else "no MoE layers")
        return out
    out += attention_blockers(fam, cfg)
    if cfg.model.mtp_layers and not fam.mtp_key:
        out.append(f"model.mtp_layers={cfg.model.mtp_layers} ({fam.name} stores no multi-token-prediction layers)")
    if moe:
        out += moe_blockers(fam, cfg)
    return out


def choose_family(cfg, family: str | None = None) -> Family:
    """The family export writes ``cfg`` as: ``family`` when given (``export-hf --family``), else the one it was
    imported from (``model.hf_family``) when that expresses it, else the first of ``FAMILIES`` (dense or MoE,
    as ``cfg`` is) that does.  Raises ConversionError naming an unknown ``family`` and the known ones, what a
    given ``family`` cannot express, or, when no family expresses ``cfg``, what the closest one lacks."""
    if family is not None:
        fam = ALIASES.get(family) or BY_NAME.get(family)
        if fam is None:
            raise ConversionError(f"--family {family} is not a family export-hf writes; choose one of "
                                  + ", ".join(BY_NAME))
        lacks = blockers(fam, cfg)
        if lacks:
            raise ConversionError(f"{fam.name} cannot express this model: " + "; ".join(lacks)
                                  + "; leave out --family to write the first family that can")
        return fam
    moe = "moe" in cfg.model.layer_kinds()
    imported = BY_NAME.get(cfg.model.hf_family)
    order = [f for f in FAMILIES if f.moe == moe]
    if imported is not None and imported.moe == moe:
        order = [imported] + [f for f in order if f is not imported]
    found = {f.name: blockers(f, cfg) for f in order}
    for fam in order:
        if not found[fam.name]:
            return fam
    closest = min(found, key=lambda name: len(found[name]))
    raise ConversionError(f"no Hugging Face family computes this model; the closest, {closest}, cannot express: "
                          + "; ".join(found[closest]) + ". Use `consolidate` for a sparselm checkpoint instead")


def generation_config(eod_id: int) -> dict:
    """generation_config.json: transformers' generate stops at our end-of-document token and pads with it (no
    beginning-of-sequence token: sparselm prepends none)."""
    return {"bos_token_id": None, "eos_token_id": eod_id, "pad_token_id": eod_id}


def attention_config(fam: Family, m) -> dict:
    """config.json entries of ``fam``'s attention options (windows, q/k/v bias switch, q/k norm switch,
    clipping, legacy rotary width) for sparselm's ``cfg.model`` ``m``."""
    out = {}
    sliding = [m.layer_window(i) > 0 for i in range(m.n_layers)]
    window = m.sliding_window if any(sliding) else None
    if fam.window == "per_layer":
        out.update(sliding_window=window, max_window_layers=m.n_layers,
                   layer_types=["sliding_attention" if s else "full_attention" for s in sliding])
        if fam.window_switch:  # transformers drops the window unless use_sliding_window
            out["use_sliding_window"] = window is not None
    elif fam.window == "all":
        out["sliding_window"] = window
        if fam.window_switch:  # transformers drops the window unless use_sliding_window
            out["use_sliding_window"] = window is not None
    if fam.qkv_bias_key:
        out[fam.qkv_bias_key] = m.qkv_bias  # with o_bias_key the same key: blockers made sure o_bias is equal
    if fam.qk_norm_key:
        out[fam.qk_norm_key] = m.qk_norm == fam.qk_norm
    if fam.clip_qkv:
        out["clip_qkv"] = m.clip_qkv or None
    if fam.legacy_rotary_dim:  # beside rope_parameters.partial_rotary_factor, which transformers reads first
        out["rotary_dim"] = int(m.head_width * m.rotary_fraction)
    return out


def moe_config(fam: Family, cfg) -> dict:
    """config.json entries of MoE family ``fam``'s block (experts, router, shared experts, dense layers)."""
    e, kinds = cfg.moe, cfg.model.layer_kinds()
    hidden = resolved_expert_hidden(cfg)
    out = {fam.top_k_key: e.top_k, "norm_topk_prob": e.renormalize, "router_aux_loss_coef": e.aux_loss_coef,
           "output_router_logits": False, fam.experts_key: e.num_experts, fam.expert_hidden_key: hidden}
    out.update(fam.fixed_config)
    if fam.dense_layers == "listed":
        out.update(decoder_sparse_step=1, mlp_only_layers=[i for i, k in enumerate(kinds) if k == "dense"])
    elif fam.dense_layers == "first":
        out["first_k_dense_replace"] = kinds.count("dense")
    elif fam.dense_layers == "types":
        out["mlp_layer_types"] = ["dense" if k == "dense" else "sparse" for k in kinds]
    elif fam.dense_layers == "interval":  # blockers made sure the fields exist
        start, end, interval = interval_fields([k == "moe" for k in kinds])
        out.update(moe_layer_start_index=start, moe_layer_end_index=end, moe_layer_interval=interval)
    if fam.renormalize_min_key:
        out[fam.renormalize_min_key] = 1e-12
    shared = fam.shared_experts
    if shared:
        width = resolved_shared_hidden(cfg)
        out[shared.key] = width if shared.key_is_width else width // hidden
    if fam.group_routing:
        out.update(n_group=e.n_group, topk_group=e.topk_group, routed_scaling_factor=e.routed_scaling_factor)
    if fam.clamped_swiglu:
        out.update(swiglu_limit=e.swiglu_limit, swiglu_alpha=e.swiglu_alpha)
    if fam.group_score == "max":
        out["topk_method"] = "group_limited_greedy" if e.n_group > 1 else "greedy"
    return out


def hf_config(fam: Family, cfg, eod_id: int) -> dict:
    """config.json of ``cfg`` as family ``fam`` (transformers 5 keys; ``eod_id`` is the end-of-sequence id;
    'dtype' says float32 until the caller sets the stored one)."""
    m = cfg.model
    out = {"architectures": [fam.architecture], "model_type": fam.name, "bos_token_id": None,
           "eos_token_id": eod_id, "vocab_size": m.vocab_size, "hidden_size": m.d_model,
           "num_hidden_layers": m.n_layers, "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads,
           "head_dim": m.head_width, "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps,
           "hidden_act": "silu", "tie_word_embeddings": m.tie_embeddings, "rope_parameters": rope_parameters(m),
           "intermediate_size": m.ffn_hidden, "attention_bias": False, "dtype": "float32"}
    out.update(attention_config(fam, m))
    if fam.bias_key:
        out[fam.bias_key] = False
    if fam.mla:  # transformers' DeepSeek configs carry head_dim = qk_rope_head_dim
        out.update(q_lora_rank=m.q_lora_rank or None, kv_lora_rank=m.kv_lora_rank, qk_nope_head_dim=m.qk_nope_head_dim,
                   qk_rope_head_dim=m.qk_rope_head_dim, v_head_dim=m.v_head_dim, head_dim=m.qk_rope_head_dim,
                   num_key_value_heads=m.n_heads)
        if fam.rope_interleave_key:
            out[fam.rope_interleave_key] = m.rope_interleave
        if m.rope.scaling != "none" and m.rope.mscale_all_dim:
            out["rope_parameters"]["mscale_all_dim"] = m.rope.mscale_all_dim
    if fam.mtp_key:
        out[fam.mtp_key] = m.mtp_layers
    if fam.moe:
        out.update(moe_config(fam, cfg))
    return out
