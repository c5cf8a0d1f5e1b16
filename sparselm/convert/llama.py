"""sparselm dense models <-> the Hugging Face Llama layout.

Our blocks are Llama blocks with the same rotary convention (half-split ``rotate_half``), so the
conversion is a renaming; numbers are checked after every conversion by the tests.
"""
from __future__ import annotations

import torch

from sparselm.convert.store import ConversionError

# ours -> Hugging Face, per layer
LAYER_NAMES = {
    "input_norm.weight": "input_layernorm.weight",
    "post_attn_norm.weight": "post_attention_layernorm.weight",
    "attn.q_proj.weight": "self_attn.q_proj.weight",
    "attn.k_proj.weight": "self_attn.k_proj.weight",
    "attn.v_proj.weight": "self_attn.v_proj.weight",
    "attn.o_proj.weight": "self_attn.o_proj.weight",
    "ffn.gate_proj.weight": "mlp.gate_proj.weight",
    "ffn.up_proj.weight": "mlp.up_proj.weight",
    "ffn.down_proj.weight": "mlp.down_proj.weight",
}
GLOBAL_NAMES = {"embed.weight": "model.embed_tokens.weight", "head.norm.weight": "model.norm.weight",
                "head.proj.weight": "lm_head.weight"}


def attention_and_norm_names(i: int) -> dict[str, str]:
    """Names shared by every HF decoder layout we export (attention and the two norms)."""
    return {f"layers.{i}.{ours}": f"model.layers.{i}.{theirs}" for ours, theirs in LAYER_NAMES.items()
            if not ours.startswith("ffn.")}


def check_exportable(cfg, allowed_kinds: set[str], target: str) -> None:
    kinds = set(cfg.model.layer_kinds())
    unsupported = kinds - allowed_kinds
    if unsupported:
        raise ConversionError(
            f"this model has {', '.join(sorted(unsupported))} layers, which have no Hugging Face {target} equivalent; "
            "export-hf supports dense models (Llama layout) and models whose every layer is MoE (Mixtral layout). "
            "Use `consolidate` for a single-file sparselm checkpoint instead")
    attention = getattr(cfg, "attention", None)
    if attention is not None and (getattr(attention, "pattern", "causal") != "causal" or getattr(attention, "persistent_slots", 0)):
        raise ConversionError("this model uses sparse attention or persistent memory, which Hugging Face "
                              f"{target} does not have; use `consolidate` instead")


def token_ids(eod_id: int) -> dict:
    """The special token ids a Hugging Face config must carry, or transformers assumes Llama's 1 and 2: end of
    sequence = our end-of-document id; no beginning-of-sequence token (sparselm prepends none)."""
    return {"bos_token_id": None, "eos_token_id": eod_id}


def generation_config(eod_id: int) -> dict:
    """generation_config.json: transformers' generate stops at our end-of-document token and pads with it."""
    return {**token_ids(eod_id), "pad_token_id": eod_id}


def common_hf_config(cfg, eod_id: int) -> dict:
    m = cfg.model
    return {**token_ids(eod_id),
        "vocab_size": m.vocab_size, "hidden_size": m.d_model, "num_hidden_layers": m.n_layers,
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_width,
        "max_position_embeddings": m.max_seq_len, "rms_norm_eps": m.norm_eps, "hidden_act": "silu",
        "rope_theta": m.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": False, "torch_dtype": "float32",
    }


def to_llama(tensors: dict[str, torch.Tensor], cfg, eod_id: int) -> tuple[dict[str, torch.Tensor], dict]:
    check_exportable(cfg, {"dense"}, "Llama")
    out = {GLOBAL_NAMES[k]: v for k, v in tensors.items() if k in GLOBAL_NAMES}
    if cfg.model.tie_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(cfg.model.n_layers):
        for ours, theirs in LAYER_NAMES.items():
            out[f"model.layers.{i}.{theirs}"] = tensors[f"layers.{i}.{ours}"]
    hf = {**common_hf_config(cfg, eod_id), "architectures": ["LlamaForCausalLM"], "model_type": "llama",
          "intermediate_size": cfg.model.ffn_hidden, "mlp_bias": False}
    return out, hf
