"""sparselm MoE models -> the Hugging Face Mixtral layout (transformers 5 fused-expert tensors).

Mixtral's block: softmax router over all experts in fp32, top-k, weights renormalised to sum to 1, every
token processed (no capacity), SwiGLU experts, no shared experts; every layer is an MoE layer.  Our MoE
layer computes the same function with: moe.score_func=softmax, moe.renormalize=true,
moe.drop_tokens=false, moe.num_shared_experts=0, moe.noisy_gating=false, moe.bias_balancing=false.
"""
from __future__ import annotations

import torch

from sparselm.convert.llama import GLOBAL_NAMES, attention_and_norm_names, check_exportable, common_hf_config
from sparselm.convert.store import ConversionError
from sparselm.model.moe.config import resolved_expert_hidden

REQUIRED = {"score_func": "softmax", "renormalize": True, "drop_tokens": False, "num_shared_experts": 0,
            "noisy_gating": False, "bias_balancing": False}


def check_mixtral_equivalent(cfg) -> None:
    check_exportable(cfg, {"dense", "moe"}, "Mixtral")
    if set(cfg.model.layer_kinds()) != {"moe"}:
        raise ConversionError("Mixtral has an MoE feed-forward in every layer; this model mixes in dense layers")
    wrong = [f"moe.{k}={getattr(cfg.moe, k)!r} (Mixtral needs {v!r})" for k, v in REQUIRED.items() if getattr(cfg.moe, k) != v]
    if wrong:
        raise ConversionError("this MoE configuration computes a different function from Mixtral's: " + "; ".join(wrong))


def to_mixtral(tensors: dict[str, torch.Tensor], cfg, eod_id: int) -> tuple[dict[str, torch.Tensor], dict]:
    check_mixtral_equivalent(cfg)
    out = {GLOBAL_NAMES[k]: v for k, v in tensors.items() if k in GLOBAL_NAMES}
    if cfg.model.tie_embeddings:
        out.pop("lm_head.weight", None)
    for i in range(cfg.model.n_layers):
        for ours, theirs in attention_and_norm_names(i).items():
            out[theirs] = tensors[ours]
        prefix = f"model.layers.{i}.mlp"
        out[f"{prefix}.gate.weight"] = tensors[f"layers.{i}.ffn.router.weight"]
        out[f"{prefix}.experts.gate_up_proj"] = tensors[f"layers.{i}.ffn.experts.gate_up_proj"]
        out[f"{prefix}.experts.down_proj"] = tensors[f"layers.{i}.ffn.experts.down_proj"]
    hf = {**common_hf_config(cfg, eod_id), "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
          "intermediate_size": resolved_expert_hidden(cfg), "num_local_experts": cfg.moe.num_experts,
          "num_experts_per_tok": cfg.moe.top_k, "router_aux_loss_coef": cfg.moe.aux_loss_coef,
          "output_router_logits": False, "router_jitter_noise": 0.0, "sliding_window": None}
    return out, hf
