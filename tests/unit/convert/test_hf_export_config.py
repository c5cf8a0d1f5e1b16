"""export-hf's config.json as transformers reads it: every setting that changes what the model computes comes
back with the model's value, whatever the family's own defaults are (GLM-4-MoE's partial_rotary_factor is 0.5
when absent: a model rotating whole heads must say 1.0).

Configs only (no weights): each case is a sparselm model config, written by ``hf_config`` and loaded by
transformers' config class of the chosen family, offline.
"""
from __future__ import annotations

import json

import pytest
import torch

from sparselm.config import load_config
from sparselm.convert.hf_export_config import choose_family, hf_config
from sparselm.model.moe.config import resolved_expert_hidden, resolved_shared_hidden
from sparselm.model.rotary import latent_softmax_scale, rope_frequencies

transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (make setup installs it)")

BASE = {"model": {"d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 2, "d_ff": 96, "vocab_size": 256,
                  "max_seq_len": 128, "norm_eps": 1e-6}, "data": {"seq_len": 32}}
MOE = {"num_experts": 8, "top_k": 2, "expert_hidden": 32, "aux_loss_coef": 0.0, "z_loss_coef": 0.0}
GLM = {"model": {"pattern": ["dense", "moe", "moe"], "qk_norm": "per_head", "qkv_bias": True},
       "moe": {**MOE, "score_func": "sigmoid", "bias_balancing": True, "num_shared_experts": 1, "n_group": 2,
               "topk_group": 1, "routed_scaling_factor": 1.8}}
MINIMAX = {**MOE, "score_func": "sigmoid", "bias_balancing": True}
MLA = {"pattern": ["dense", "moe", "moe"], "attention": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 16,
       "qk_rope_head_dim": 8, "v_head_dim": 24, "n_kv_heads": 0}
CASES = {  # name -> (overrides on BASE, the family export must choose)
    "llama": ({}, "llama"),
    "llama yarn": ({"model": {"rope": {"scaling": "yarn", "factor": 4.0, "original_max_seq_len": 32,
                                       "attention_factor": 1.2, "truncate": False}}}, "llama"),
    "llama llama3, tied": ({"model": {"tie_embeddings": True, "rope": {
        "scaling": "llama3", "factor": 8.0, "original_max_seq_len": 16, "theta": 500000.0}}}, "llama"),
    "mistral": ({"model": {"attention_layers": ["sliding"], "sliding_window": 8, "head_dim": 24}}, "mistral"),
    # written as the family imported from (model.hf_family) where the first to express it is another one: its
    # defaults (Mistral's 4096-token window, GLM-4-MoE's partial rotary) must not apply
    "mistral without windows, imported": ({"model": {"hf_family": "mistral"}}, "mistral"),
    "qwen2": ({"model": {"qkv_bias": True, "attention_layers": ["full", "sliding"], "sliding_window": 8}}, "qwen2"),
    "qwen3": ({"model": {"qk_norm": "per_head", "head_dim": 32}}, "qwen3"),
    "mixtral": ({"model": {"pattern": ["moe"]}, "moe": MOE}, "mixtral"),
    "qwen3_moe": ({"model": {"pattern": ["dense", "moe"], "qk_norm": "per_head"}, "moe": MOE}, "qwen3_moe"),
    "qwen2_moe": ({"model": {"pattern": ["moe"], "qkv_bias": True},
                   "moe": {**MOE, "num_shared_experts": 2, "shared_expert_gate": True, "renormalize": False}},
                  "qwen2_moe"),
    "qwen2_moe shared width 40": ({"model": {"pattern": ["moe"], "qkv_bias": True},
                                   "moe": {**MOE, "num_shared_experts": 1, "shared_expert_hidden": 40,
                                           "shared_expert_gate": True}}, "qwen2_moe"),
    "olmoe": ({"model": {"pattern": ["moe"], "qk_norm": "full", "clip_qkv": 0.6}, "moe": {**MOE, "renormalize": False}},
              "olmoe"),
    "glm4_moe whole-head rotary": (GLM, "glm4_moe"),
    "glm4_moe partial rotary": ({**GLM, "model": {**GLM["model"], "rotary_fraction": 0.5}}, "glm4_moe"),
    "glm4_moe that dots1 also expresses, imported": ({**GLM, "model": {**GLM["model"], "qkv_bias": False,
                                                                       "hf_family": "glm4_moe"}}, "glm4_moe"),
    "glm4_moe no qk norm, no bias": ({**GLM, "model": {**GLM["model"], "qk_norm": "none", "qkv_bias": False}},
                                     "glm4_moe"),
    "dots1 q/k/v/o biases, windows from layer 1": ({**GLM, "model": {
        **GLM["model"], "o_bias": True, "sliding_window": 8, "attention_layers": ["full", "sliding", "sliding"]}},
                                                   "dots1"),
    "dots1 no bias, no window, no groups, raw weights": ({"model": {"pattern": ["moe"], "qk_norm": "per_head"}, "moe": {
        **GLM["moe"], "n_group": 1, "topk_group": 1, "routed_scaling_factor": 1.0, "renormalize": False,
        "num_shared_experts": 2}}, "dots1"),
    "minimax_m2 partial rotary": ({"model": {"pattern": ["moe"], "qk_norm": "full", "rotary_fraction": 0.5,
                                             "head_dim": 32}, "moe": MINIMAX}, "minimax_m2"),
    "minimax_m2 whole-head rotary, tied, yarn": ({"model": {
        "pattern": ["moe"], "qk_norm": "full", "tie_embeddings": True,
        "rope": {"scaling": "yarn", "factor": 4.0, "original_max_seq_len": 32}}, "moe": MINIMAX}, "minimax_m2"),
    "deepseek_v3 latent q, interleaved, yarn, mtp": ({**GLM, "model": {**MLA, "q_lora_rank": 24, "mtp_layers": 1,
                                                                      "rope_interleave": True, "rope": {
        "scaling": "yarn", "factor": 4.0, "original_max_seq_len": 32, "mscale_all_dim": 0.8}}}, "deepseek_v3"),
    "deepseek_v3 one q, half-split": ({**GLM, "moe": {**GLM["moe"], "renormalize": False},
                                       "model": {**MLA, "tie_embeddings": True}}, "deepseek_v3"),
    "deepseek_v2 groups by their best expert": ({"model": {**MLA, "rope_interleave": True}, "moe": {
        **MOE, "renormalize": False, "num_shared_experts": 2, "n_group": 4, "topk_group": 2, "group_score": "max",
        "routed_scaling_factor": 16.0}}, "deepseek_v2"),
    "deepseek_v2 greedy": ({"model": {**MLA, "rope_interleave": True, "q_lora_rank": 24}, "moe": {
        **MOE, "renormalize": False, "num_shared_experts": 1}}, "deepseek_v2"),
    "ernie4_5_moe shared, a dense layer after the MoE one": ({"model": {"pattern": ["dense", "moe", "dense"],
                                                                       "rope_interleave": True},
                                                             "moe": {**MOE, "bias_balancing": True,
                                                                     "num_shared_experts": 2}}, "ernie4_5_moe"),
    "ernie4_5_moe every other layer, unshared, tied, yarn": ({"model": {
        "n_layers": 4, "pattern": ["dense", "moe", "dense", "moe"], "rope_interleave": True, "tie_embeddings": True,
        "head_dim": 24, "rope": {"scaling": "yarn", "factor": 4.0, "original_max_seq_len": 32}},
        "moe": {**MOE, "bias_balancing": True}}, "ernie4_5_moe"),
}
# transformers config keys that do not change what a loaded model computes (bookkeeping, labels, outputs,
# training-only dropout that sparselm does not have), or an alias of a key export writes
NOT_COMPUTATION = {"_name_or_path", "attention_dropout", "chunk_size_feed_forward", "id2label", "label2id",
                   "initializer_range", "is_encoder_decoder", "output_attentions", "output_hidden_states",
                   "pad_token_id", "problem_type", "return_dict", "transformers_version", "use_cache",
                   "num_local_experts", "qk_head_dim"}  # qk_head_dim: DeepSeek's derived nope + rope width


def merged(base: dict, extra: dict) -> dict:
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in base.items()}
    for k, v in extra.items():
        out[k] = {**out.get(k, {}), **v} if isinstance(v, dict) else v
    return out


def flat_keys(d: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in d.items():
        out |= flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and k == "rope_parameters" else {prefix + k}
    return out


def model_computes(cfg) -> dict:
    """What the sparselm model computes with, by setting."""
    m, e = cfg.model, cfg.moe
    kinds = m.layer_kinds()
    inv_freq, attention_factor = rope_frequencies(m, m.qk_rope_head_dim if m.attention == "mla" else 0)
    out = {"d_model": m.d_model, "n_layers": m.n_layers, "n_heads": m.n_heads, "kv_heads": m.kv_heads,
           "head_width": m.head_width, "vocab": m.vocab_size, "norm_eps": m.norm_eps,
           "tie": m.tie_embeddings, "act": "silu", "inv_freq": inv_freq.tolist(), "rope_scale": attention_factor,
           "windows": [m.layer_window(i) for i in range(m.n_layers)], "qkv_bias": m.qkv_bias, "o_bias": m.o_bias,
           "mlp_bias": False, "head_bias": False, "qk_norm": m.qk_norm, "clip_qkv": m.clip_qkv or None,
           "moe_layers": [k == "moe" for k in kinds], "interleave": m.rope_interleave}
    if m.attention == "mla":
        out.update(q_lora_rank=m.q_lora_rank, kv_lora_rank=m.kv_lora_rank, qk_nope=m.qk_nope_head_dim,
                   qk_rope=m.qk_rope_head_dim, v_head=m.v_head_dim, interleave=m.rope_interleave,
                   softmax_scale=latent_softmax_scale(m, m.qk_nope_head_dim + m.qk_rope_head_dim), mtp=m.mtp_layers)
        out["head_width"] = m.qk_rope_head_dim  # transformers' DeepSeek head_dim: the rotary width
    if "dense" in kinds:  # the dense layers' width (an all-MoE model has none)
        out["d_ff"] = m.ffn_hidden
    if "moe" in kinds:
        out.update(experts=e.num_experts, top_k=e.top_k, renormalize=e.renormalize,
                   expert_hidden=resolved_expert_hidden(cfg), shared_hidden=resolved_shared_hidden(cfg),
                   shared_gate=e.shared_expert_gate, score_func=e.score_func, selection_bias=e.bias_balancing,
                   n_group=e.n_group, topk_group=e.topk_group, scaling=e.routed_scaling_factor)
        if e.n_group > 1 and e.group_score != "top2_sum":
            out["group_score"] = e.group_score
    return out


def transformers_computes(c, family: str) -> dict:
    """What transformers' model of config ``c`` (family ``family``) computes with, by the same settings: read off
    the resolved config object as transformers' modeling code of the family reads it."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = c.rope_parameters
    head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if rope["rope_type"] == "default":
        dim = int(head * rope.get("partial_rotary_factor", 1.0))
        inv_freq, scale = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), 1.0
    else:
        inv_freq, scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](c, "cpu")
    n = c.num_hidden_layers
    types = getattr(c, "layer_types", None) or ["sliding_attention"] * n
    window = getattr(c, "sliding_window", None) or 0
    ignored = family in ("mistral", "mixtral", "qwen2", "qwen2_moe", "minimax_m2")  # built without attention_bias
    bias = {"qwen2": True, "qwen2_moe": getattr(c, "qkv_bias", False)}.get(
        family, not ignored and bool(getattr(c, "attention_bias", False)))
    o_bias = family != "glm4_moe" and not ignored and bool(getattr(c, "attention_bias", False))
    all_bias = family == "ernie4_5_moe" and bool(c.use_bias)  # q, k, v, o, the MLPs and lm_head
    if family == "ernie4_5_moe":
        bias = o_bias = all_bias
    qk = {"qwen3": "per_head", "qwen3_moe": "per_head", "olmoe": "full", "dots1": "per_head", "minimax_m2": "full",
          "glm4_moe": "per_head" if getattr(c, "use_qk_norm", False) else "none"}.get(family, "none")
    out = {"d_model": c.hidden_size, "n_layers": n, "n_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
           "head_width": head, "vocab": c.vocab_size, "norm_eps": c.rms_norm_eps,
           "tie": c.tie_word_embeddings, "act": c.hidden_act, "inv_freq": inv_freq.float().tolist(),
           "rope_scale": pytest.approx(scale, rel=1e-12),
           "windows": [window if t == "sliding_attention" else 0 for t in types], "qkv_bias": bias, "o_bias": o_bias,
           "mlp_bias": bool(getattr(c, "mlp_bias", False)) or all_bias, "head_bias": all_bias, "qk_norm": qk,
           "clip_qkv": getattr(c, "clip_qkv", None), "moe_layers": [False] * n,
           "interleave": family == "ernie4_5_moe"}  # Ernie4_5_Moe's apply_rotary_pos_emb: pairs (0, 1), (2, 3) ...
    if family in ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "deepseek_v3", "deepseek_v2", "dots1",
                  "minimax_m2", "ernie4_5_moe", "gpt_oss", "glm4_moe_lite"):
        if family in ("qwen2_moe", "qwen3_moe"):
            dense = set(c.mlp_only_layers or [])
            moe = [i not in dense and (i + 1) % c.decoder_sparse_step == 0 for i in range(n)]
        elif family in ("glm4_moe", "deepseek_v3", "deepseek_v2", "dots1"):
            moe = [i >= c.first_k_dense_replace for i in range(n)]
        elif family == "glm4_moe_lite":
            moe = [t == "sparse" for t in c.mlp_layer_types]
        elif family == "ernie4_5_moe":  # Ernie4_5_MoeDecoderLayer
            moe = [(i + 1) % c.moe_layer_interval == 0 and c.moe_layer_start_index <= i <= c.moe_layer_end_index
                   for i in range(n)]
        else:
            moe = [True] * n
        hidden = (c.intermediate_size if family in ("mixtral", "olmoe", "minimax_m2", "gpt_oss")
                  else c.moe_intermediate_size)
        shared = {"qwen2_moe": getattr(c, "shared_expert_intermediate_size", 0),
                  "glm4_moe": (getattr(c, "n_shared_experts", 0) or 0) * hidden,
                  "deepseek_v3": (getattr(c, "n_shared_experts", 0) or 0) * hidden,
                  "deepseek_v2": (getattr(c, "n_shared_experts", 0) or 0) * hidden,
                  "dots1": (getattr(c, "n_shared_experts", 0) or 0) * hidden,
                  "glm4_moe_lite": (getattr(c, "n_shared_experts", 0) or 0) * hidden,
                  "ernie4_5_moe": (getattr(c, "moe_num_shared_experts", 0) or 0) * hidden}.get(family, 0)
        out.update(moe_layers=moe, experts=getattr(c, "num_local_experts", None) or getattr(c, "num_experts", None)
                   or c.n_routed_experts, top_k=c.num_experts_per_tok,
                   renormalize=True if family in ("mixtral", "minimax_m2", "ernie4_5_moe", "gpt_oss")
                   else c.norm_topk_prob,
                   expert_hidden=hidden, shared_hidden=shared, shared_gate=family == "qwen2_moe" and shared > 0,
                   score_func="sigmoid" if family in ("glm4_moe", "deepseek_v3", "dots1", "minimax_m2", "glm4_moe_lite")
                   else "softmax",
                   selection_bias=family in ("glm4_moe", "deepseek_v3", "dots1", "minimax_m2", "ernie4_5_moe",
                                             "glm4_moe_lite"),
                   n_group=getattr(c, "n_group", 1), topk_group=getattr(c, "topk_group", 1),
                   scaling=getattr(c, "routed_scaling_factor", 1.0))
        if family == "deepseek_v2":  # no renormalisation; groups (by their best expert) only when group-limited
            grouped = c.topk_method == "group_limited_greedy"
            out.update(renormalize=False, n_group=c.n_group if grouped else 1,
                       topk_group=c.topk_group if grouped else 1)
            if grouped:
                out["group_score"] = "max"
    if family in ("deepseek_v3", "deepseek_v2", "glm4_moe_lite"):
        from transformers.modeling_rope_utils import yarn_apply_mscale

        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        out.update(q_lora_rank=c.q_lora_rank or 0, kv_lora_rank=c.kv_lora_rank, qk_nope=c.qk_nope_head_dim,
                   qk_rope=c.qk_rope_head_dim, v_head=c.v_head_dim,
                   interleave=c.rope_interleave if family != "deepseek_v2" else True,
                   softmax_scale=pytest.approx(yarn_apply_mscale(c.rope_parameters, qk ** -0.5), rel=1e-12),
                   mtp=getattr(c, "num_nextn_predict_layers", 0), qk_norm="none", qkv_bias=False,
                   o_bias=c.attention_bias)
    if not all(out["moe_layers"]):
        out["d_ff"] = c.intermediate_size
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_exported_config_makes_transformers_compute_the_model(tmp_path, case):
    """The exported config.json, loaded by transformers: every key of the family's config (its rotary dict
    included) that changes the computation is written, and each setting transformers then computes with
    equals the model's."""
    overrides, expected = CASES[case]
    cfg = load_config(None, merged(BASE, overrides))
    fam = choose_family(cfg)
    assert fam.name == expected
    written = hf_config(fam, cfg, eod_id=0)
    config_class = transformers.CONFIG_MAPPING[fam.name]
    defaults = config_class().to_dict()
    unwritten = flat_keys(defaults) - flat_keys(written) - NOT_COMPUTATION
    # left to the family default only where that default is what the model computes
    for key in unwritten:
        assert key in ("mlp_bias", "pretraining_tp") and defaults[key] in (False, 1), (case, key)
    loaded = config_class.from_dict(written)
    theirs, ours = transformers_computes(loaded, fam.name), model_computes(cfg)
    if "rotary_dim" in written:  # MiniMax-M2's legacy spelling, which other readers take: the same width
        assert written["rotary_dim"] == 2 * len(theirs["inv_freq"])
    assert theirs == ours, {k: (ours.get(k), theirs.get(k)) for k in ours if theirs.get(k) != ours.get(k)}


def test_export_writes_the_family_the_model_came_from_or_the_one_named():
    """A GLM-4-MoE with per-head q/k norms and neither biases nor partial rotary is a dots1 model too: imported
    as glm4_moe (model.hf_family) it goes back as glm4_moe; --family picks either; a family that cannot express
    the model, or that does not exist, is refused naming why; an imported family the model has outgrown (an
    upcycled llama) gives way to the first family that expresses it."""
    from sparselm.config import load_config
    from sparselm.errors import ConversionError

    def config(hf_family: str, overrides: dict) -> object:
        merged = {**BASE, **overrides, "model": {**BASE["model"], **overrides.get("model", {}), "hf_family": hf_family}}
        return load_config(None, merged)

    both = {**GLM, "model": {**GLM["model"], "qkv_bias": False}}
    assert choose_family(config("glm4_moe", both)).name == "glm4_moe"
    assert choose_family(config("", both)).name == "dots1"
    assert choose_family(config("glm4_moe", both), "dots1").name == "dots1"
    with pytest.raises(ConversionError, match=r"^llama cannot express this model: MoE layers; leave out --family"):
        choose_family(config("glm4_moe", both), "llama")
    with pytest.raises(ConversionError, match=r"--family glm5 is not a family export-hf writes; choose one of llama"):
        choose_family(config("glm4_moe", both), "glm5")
    assert choose_family(config("llama", {"model": {"pattern": ["moe"]}, "moe": MOE})).name == "mixtral"


FAMILY_SHAPES = {"deepseek_v3": {"kv_lora_rank": 16, "q_lora_rank": 24, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8,
                                 "v_head_dim": 16}}
FAMILY_SHAPES["deepseek_v2"] = FAMILY_SHAPES["glm4_moe_lite"] = FAMILY_SHAPES["deepseek_v3"]


@pytest.mark.parametrize("family", sorted(__import__("sparselm.convert.hf_families", fromlist=["BY_NAME"]).BY_NAME))
def test_a_config_json_that_leaves_keys_out_imports_with_transformers_defaults(family):
    """A config.json holding only the model's sizes: transformers fills the rest with its config class's
    defaults, which differ by family (Mixtral's rope_theta 1e6, Mistral's 4096-token window and 8 key/value
    heads, GLM-4-MoE's partial rotary, first dense layer and renormalised weights, gpt-oss's yarn and sliding
    layers, ERNIE's tied embeddings ...); import must compute what transformers then computes, setting by
    setting."""
    from sparselm.convert.hf_import_config import sparselm_config

    cls = transformers.CONFIG_MAPPING[family]
    full = json.loads(cls().to_json_string(use_diff=False))
    sizes = ["hidden_size", "num_attention_heads", "vocab_size", "intermediate_size", "num_experts_per_tok",
             "num_local_experts", "num_experts", "n_routed_experts", "moe_intermediate_size", "moe_num_experts",
             "moe_k"]
    given = {k: full[k] for k in sizes if full.get(k) is not None}
    given.update(num_hidden_layers=4, **FAMILY_SHAPES.get(family, {}))
    for key, value in (("n_routed_experts", 4), ("num_experts_per_tok", 2)):
        if key in full and full[key] is None:  # some families' default configs describe no routed experts
            given[key] = value
    if given["hidden_size"] % given["num_attention_heads"] and not full.get("head_dim"):
        given["hidden_size"] = 64 * given["num_attention_heads"]  # GLM-4-MoE's default 4096 / 96 is no model's
    theirs = transformers_computes(cls(**given), family)
    cfg = load_config(None, {**sparselm_config({"model_type": family, **given}), "data": {"seq_len": 16}})
    ours = model_computes(cfg)
    assert theirs == ours, {k: (ours.get(k), theirs.get(k)) for k in ours.keys() | theirs.keys()
                            if theirs.get(k) != ours.get(k)}


def test_a_config_json_without_a_size_is_refused_naming_it():
    from sparselm.convert.hf_import_config import sparselm_config
    from sparselm.errors import ConversionError

    sizes = {"model_type": "mixtral", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "vocab_size": 100, "intermediate_size": 64}
    with pytest.raises(ConversionError, match="mixtral model has no 'num_experts_per_tok': .*add it"):
        sparselm_config(sizes)
