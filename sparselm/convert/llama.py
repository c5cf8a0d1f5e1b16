"""sparselm dense models <-> the Hugging Face Llama layout.

Our blocks are Llama blocks with the same rotary convention (half-split ``rotate_half``), so the
conversion is a renaming; numbers are checked after every conversion by the tests.
"""
from __future__ import annotations

import json
from pathlib import Path

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
        "num_attention_heads": m.n_heads, "num_key_value_heads": m.kv_heads, "head_dim": m.head_dim,
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


def read_hf_dir(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"'{path}' has no config.json; give a Hugging Face model directory")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConversionError(f"'{path}' has no .safetensors weights (pytorch_model.bin is not read: it would "
                              "unpickle arbitrary objects); re-save it with save_pretrained(safe_serialization=True)")
    tensors = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return tensors, json.loads(config_file.read_text())


def hf_rope(hf: dict) -> tuple[str, float, float, str]:
    """(rope type, theta, partial rotary factor, the key the rope settings came from) of a Hugging Face config,
    read with transformers' own precedence (``PreTrainedConfig.convert_rope_params_to_dict``): a non-empty
    ``rope_scaling`` (the 4.x spelling) replaces ``rope_parameters``; the type is ``rope_type`` or the older
    ``type``; theta and partial_rotary_factor come from that dict, else from the top level."""
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    params = hf.get(key) or {}
    if not isinstance(params, dict):
        raise ConversionError(f"config.json has {key}={params!r}, which is not a dict of rotary settings")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    return kind, theta, 1.0 if partial is None else float(partial), key


# Settings of a Llama config.json that change the function and that sparselm blocks do not implement:
# (key, whether the value is one sparselm computes, what it means).  Everything else a Llama model reads
# is carried over by from_llama.
_UNSUPPORTED = (
    ("hidden_act", lambda v: v in (None, "silu", "swish"), "the feed-forward activation; sparselm's SwiGLU uses silu"),
    ("attention_bias", lambda v: not v, "biases in the attention projections"),
    ("mlp_bias", lambda v: not v, "biases in the feed-forward projections"),
    ("quantization_config", lambda v: not v, "quantized weights; dequantize and save_pretrained them first"),
)


def check_importable(hf: dict, hf_dir) -> None:
    """Refuse, naming each field and its value, a Llama config that computes what sparselm cannot."""
    problems = [f"{key}={hf[key]!r} ({meaning})" for key, ok, meaning in _UNSUPPORTED if not ok(hf.get(key))]
    kind, _, partial, key = hf_rope(hf)
    if kind != "default":
        spelled = "rope_type" if "rope_type" in (hf.get(key) or {}) else "type"
        problems.append(f"{key}.{spelled}={kind!r} (rotary scaling; sparselm implements default rotary only)")
    if partial != 1.0:
        problems.append(f"partial_rotary_factor={partial!r} (rotary on part of each head; sparselm rotates all of it)")
    if problems:
        raise ConversionError(f"'{hf_dir}' cannot be imported without changing what it computes: "
                              + "; ".join(problems))


def from_llama(hf_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Hugging Face Llama directory -> (our tensors, overrides for our model config)."""
    tensors, hf = read_hf_dir(hf_dir)
    if hf.get("model_type") != "llama":
        raise ConversionError(f"'{hf_dir}' holds a {hf.get('model_type')!r} model; import-hf reads the Llama layout")
    check_importable(hf, hf_dir)
    rope_theta = hf_rope(hf)[1]
    n_layers = hf["num_hidden_layers"]
    inverse = {v: k for k, v in GLOBAL_NAMES.items()}
    ours = {inverse[k]: v for k, v in tensors.items() if k in inverse}
    for i in range(n_layers):
        for mine, theirs in LAYER_NAMES.items():
            key = f"model.layers.{i}.{theirs}"
            if key not in tensors:
                raise ConversionError(f"'{hf_dir}' is missing tensor {key}")
            ours[f"layers.{i}.{mine}"] = tensors[key]
    tied = bool(hf.get("tie_word_embeddings", False))
    if tied:
        ours.pop("head.proj.weight", None)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    if head_dim * heads != hf["hidden_size"]:
        raise ConversionError("head_dim * num_attention_heads != hidden_size is not supported by sparselm attention")
    model = {
        "d_model": hf["hidden_size"], "n_layers": n_layers, "n_heads": heads,
        "n_kv_heads": hf.get("num_key_value_heads") or heads, "d_ff": hf["intermediate_size"],
        "vocab_size": hf["vocab_size"], "pad_vocab_to": 1, "max_seq_len": hf.get("max_position_embeddings", 2048),
        "rope_theta": rope_theta,
        "norm_eps": hf.get("rms_norm_eps", 1e-6), "tie_embeddings": tied, "pattern": ["dense"],
    }
    return {k: v.float() for k, v in ours.items()}, model
