"""The Hugging Face decoder families sparselm reads and writes, as transformers 5 defines them: one ``Family``
record each, in ``FAMILIES``.

``FAMILIES`` is also export's preference: the first family (dense or MoE, as the model is) that expresses a
model is written.  Adding a family is adding its record here (derive it with ``replace`` from one with the
same layout); import, export and the tensor names read nothing else about it.
"""
from __future__ import annotations

from dataclasses import replace

from sparselm.convert.hf_family import (
    Family,
    SharedExperts,
    slides_from_max_window_layers,
    slides_on_even_layers,
    slides_on_even_layers_below_max_window_layers,
)
from sparselm.errors import ConversionError

# Llama's attention_bias biases q, k, v and o together (as Qwen3's, OLMoE's, dots1's, gpt-oss's); Mistral, Mixtral,
# Qwen2(-MoE), MiniMax-M2 and ERNIE ignore the key (transformers builds their projections without it)
LLAMA = Family("llama", "LlamaForCausalLM", qkv_bias_key="attention_bias", o_bias_key="attention_bias")
MISTRAL = replace(LLAMA, name="mistral", architecture="MistralForCausalLM", window="all", qkv_bias_key=None,
                  o_bias_key=None,
                  config_defaults=(("num_key_value_heads", 8), ("sliding_window", 4096)))
QWEN2 = replace(LLAMA, name="qwen2", architecture="Qwen2ForCausalLM", qkv_bias=True, window="per_layer",
                qkv_bias_key=None, o_bias_key=None,
                window_switch=True, legacy_window_layers=slides_from_max_window_layers)
QWEN3 = replace(QWEN2, name="qwen3", architecture="Qwen3ForCausalLM", qkv_bias=False, qk_norm="per_head",
                qkv_bias_key="attention_bias", o_bias_key="attention_bias")

MIXTRAL = replace(MISTRAL, name="mixtral", architecture="MixtralForCausalLM", moe=True, experts_key="num_local_experts",
                  expert_hidden_key="intermediate_size", expert_hidden_reads=("intermediate_size",),
                  renormalize_key=None, moe_module="block_sparse_moe", expert_weights=("w1", "w3", "w2"),
                  fixed_config=(("router_jitter_noise", 0.0),),
                  config_defaults=(("rope_theta", 1e6), ("rms_norm_eps", 1e-5), ("num_key_value_heads", 8)))
QWEN3_MOE = replace(QWEN3, name="qwen3_moe", architecture="Qwen3MoeForCausalLM", moe=True, window="all",
                    legacy_window_layers=None, dense_layers="listed", config_defaults=(("num_key_value_heads", 4),))
QWEN2_MOE = replace(QWEN2, name="qwen2_moe", architecture="Qwen2MoeForCausalLM", moe=True, qkv_bias_key="qkv_bias",
                    o_bias_key=None,
                    legacy_window_layers=slides_on_even_layers_below_max_window_layers, dense_layers="listed",
                    shared_experts=SharedExperts("shared_expert_intermediate_size", "shared_expert", key_is_width=True,
                                                 gated=True),
                    config_defaults=(("shared_expert_intermediate_size", 5632),))
OLMOE = replace(LLAMA, name="olmoe", architecture="OlmoeForCausalLM", moe=True, qk_norm="full", clip_qkv=True,
                expert_hidden_key="intermediate_size", config_defaults=(("rms_norm_eps", 1e-5),))
# dots.llm1: Qwen3's attention (per-head q/k norm; attention_bias biases q, k, v and o) and its windows from
# max_window_layers without a use_sliding_window switch, GLM-4-MoE's router, shared experts and dense first layers
DOTS1 = replace(QWEN3, name="dots1", architecture="Dots1ForCausalLM", moe=True, qkv_bias_key="attention_bias",
                o_bias_key="attention_bias", window_switch=False, experts_key="n_routed_experts",
                score_func="sigmoid", selection_bias=True, group_routing=True, dense_layers="first",
                shared_experts=SharedExperts("n_shared_experts", "shared_experts"),
                config_defaults=(("sliding_window", 4096), ("max_window_layers", 62)))
GLM4_MOE = replace(LLAMA, name="glm4_moe", architecture="Glm4MoeForCausalLM", moe=True, qkv_bias_key="attention_bias",
                   o_bias_key=None,
                   qk_norm="per_head", qk_norm_key="use_qk_norm", partial_rotary=True, experts_key="n_routed_experts",
                   score_func="sigmoid", selection_bias=True, group_routing=True, dense_layers="first",
                   shared_experts=SharedExperts("n_shared_experts", "shared_experts"),
                   fixed_config=(("num_nextn_predict_layers", 0),),
                   config_defaults=(("rms_norm_eps", 1e-5), ("num_key_value_heads", 8), ("n_shared_experts", 1),
                                    ("first_k_dense_replace", 1), ("norm_topk_prob", True),
                                    ("partial_rotary_factor", 0.5)))

GPT_OSS = replace(LLAMA, name="gpt_oss", architecture="GptOssForCausalLM", moe=True, qkv_bias_key="attention_bias",
                  o_bias_key="attention_bias", qkv_bias=True, attention_sinks=True, window="per_layer",
                  legacy_window_layers=slides_on_even_layers, experts_key="num_local_experts",
                  expert_hidden_key="intermediate_size", expert_hidden_reads=("intermediate_size",),
                  renormalize_key=None, router_module="router", router_bias=True, expert_layout="gpt_oss",
                  clamped_swiglu=True, mxfp4=True,
                  config_defaults=(("rope_theta", 150000.0), ("rms_norm_eps", 1e-5), ("head_dim", 64),
                                   ("num_key_value_heads", 8), ("sliding_window", 128),
                                   ("rope_parameters", {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                        "beta_slow": 1.0, "truncate": False,
                                                        "original_max_position_embeddings": 4096})))
# MiniMax-M2 (M2, M2.1, M2.5): Mixtral's names and placement with a full-width q/k norm, partial rotary (legacy
# rotary_dim), sigmoid scores and a selection bias stored on the MoE block, no shared experts, no windows
MINIMAX_M2 = replace(MIXTRAL, name="minimax_m2", architecture="MiniMaxM2ForCausalLM", window="none", qk_norm="full",
                     partial_rotary=True, legacy_rotary_dim=True, score_func="sigmoid", selection_bias=True,
                     selection_bias_name="e_score_correction_bias",
                     config_defaults=(("head_dim", 128), ("rope_theta", 5e6), ("rms_norm_eps", 1e-6),
                                      ("num_key_value_heads", 8)))
# DeepSeek-V3 (V3, V3.1, R1; Kimi K2 and Moonlight share it): GLM-4-MoE's router and experts with multi-head
# latent attention, and its multi-token-prediction layers stored after the decoder layers
DEEPSEEK_V3 = replace(GLM4_MOE, name="deepseek_v3", architecture="DeepseekV3ForCausalLM", qkv_bias_key="attention_bias",
                      o_bias_key="attention_bias",
                      qk_norm="none", qk_norm_key=None, partial_rotary=False, mla=True,
                      mtp_key="num_nextn_predict_layers", fixed_config=(),
                      config_defaults=(("n_shared_experts", 1), ("first_k_dense_replace", 3), ("norm_topk_prob", True),
                                       ("n_group", 8), ("topk_group", 4), ("routed_scaling_factor", 2.5),
                                       ("num_nextn_predict_layers", 1)))
# DeepSeek-V2 (V2, V2-Lite): the same attention with complex-pair (interleaved) rope always, softmax scores without
# renormalisation, groups scored by their best expert (topk_method), no selection bias, no MTP layers
DEEPSEEK_V2 = replace(DEEPSEEK_V3, name="deepseek_v2", architecture="DeepseekV2ForCausalLM", score_func="softmax",
                      selection_bias=False, never_renormalize=True, group_score="max", rope_interleave_key=None,
                      mtp_key=None, config_defaults=(("n_shared_experts", 2),))
# GLM-4.x-Lite (GLM-4.7-Flash): DeepSeek-V3's attention and router, its dense layers listed by mlp_layer_types;
# its multi-token-prediction layer (model.layers.47) is not in its config.json: left out on import, said
GLM4_MOE_LITE = replace(DEEPSEEK_V3, name="glm4_moe_lite", architecture="Glm4MoeLiteForCausalLM", dense_layers="types",
                        mtp_key=None, config_defaults=(("rms_norm_eps", 1e-5), ("n_shared_experts", 1),
                                                       ("norm_topk_prob", True), ("routed_scaling_factor", 1.8)))
# ERNIE-4.5-MoE (21B-A3B, 300B-A47B): Llama attention with interleaved rope pairs, softmax scores with a selection
# bias kept [1, E] in moe_statics, always renormalised, ungated shared experts, MoE layers placed by start, end
# and interval; its multi-token-prediction tensors (model.mtp_*) are refused, or left out with --drop-mtp
ERNIE4_5_MOE = replace(LLAMA, name="ernie4_5_moe", architecture="Ernie4_5_MoeForCausalLM", moe=True, qkv_bias_key=None,
                       o_bias_key=None,
                       config_defaults=(("tie_word_embeddings", True), ("rope_theta", 500000.0), ("rms_norm_eps", 1e-5),
                                        ("max_position_embeddings", 131072), ("intermediate_size", 12288),
                                        ("moe_intermediate_size", 1536), ("moe_num_experts", 64), ("moe_k", 6),
                                        ("moe_num_shared_experts", 2), ("num_key_value_heads", 4),
                                        ("router_aux_loss_coef", 0.001)),
                       interleaved_rope=True, bias_key="use_bias",
                       experts_key="moe_num_experts", top_k_key="moe_k", renormalize_key=None,
                       renormalize_min_key="moe_norm_min", selection_bias=True, statics_bias=True,
                       dense_layers="interval", mtp_tensors=r"(^|\.)mtp_",
                       shared_experts=SharedExperts("moe_num_shared_experts", "shared_experts", optional=True),
                       fixed_config=(("num_nextn_predict_layers", 0),))

# dots1 before glm4_moe: a model both express (per-head q/k norm, no biases, whole-head rotary: an imported dots1)
# is written as dots1; GLM-4-MoE's own configs (q/k/v biases without o, partial rotary or no q/k norm) are not
FAMILIES: tuple[Family, ...] = (LLAMA, MISTRAL, QWEN2, QWEN3, MIXTRAL, QWEN3_MOE, QWEN2_MOE, OLMOE, DOTS1, GLM4_MOE,
                                GPT_OSS, MINIMAX_M2, DEEPSEEK_V3, DEEPSEEK_V2, GLM4_MOE_LITE, ERNIE4_5_MOE)
BY_NAME: dict[str, Family] = {f.name: f for f in FAMILIES}
ALIASES: dict[str, Family] = {"kimi_k2": DEEPSEEK_V3}
"""model_type values read as another family's (Kimi K2's config.json says kimi_k2; export writes deepseek_v3)."""
SUPPORTED = ", ".join([*BY_NAME, *ALIASES])
# Families left out on purpose, with what sparselm lacks.
KNOWN_UNSUPPORTED = {
}


def family(model_type) -> Family:
    """The record of ``model_type``; ConversionError naming what import-hf reads (and what a family left out
    on purpose lacks) otherwise."""
    if model_type in KNOWN_UNSUPPORTED:
        raise ConversionError(f"model_type={model_type!r} is not supported ({KNOWN_UNSUPPORTED[model_type]}); "
                              f"import-hf reads {SUPPORTED}")
    if model_type in ALIASES:
        return ALIASES[model_type]
    if model_type not in BY_NAME:
        raise ConversionError(f"model_type={model_type!r} is not supported; import-hf reads {SUPPORTED}")
    return BY_NAME[model_type]
