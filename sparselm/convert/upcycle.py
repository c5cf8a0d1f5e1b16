"""Sparse upcycling (Komatsuzaki et al. 2022): a dense checkpoint becomes an MoE one.

Every chosen layer's SwiGLU is copied into each expert and a router is initialised small.  Since the
top-k weights are renormalised to sum to 1 and every expert equals the old feed-forward, the upcycled
model computes exactly the dense model's function at step 0; training then lets the experts diverge.
"""
from __future__ import annotations

import copy

import torch

from sparselm.errors import ConversionError

ROUTER_INIT_STD = 1e-3  # small: routing starts near uniform, so experts specialise gradually


def upcycle(tensors: dict[str, torch.Tensor], cfg, experts: int, top_k: int, every: int = 1, seed: int = 0):
    """(new tensors, new config).  Layers i with (i + 1) % every == 0 become MoE layers."""
    kinds = cfg.model.layer_kinds()
    if set(kinds) != {"dense"}:
        raise ConversionError(f"upcycle takes a dense model; this one has {sorted(set(kinds))} layers")
    if not 1 <= top_k <= experts:
        raise ConversionError(f"--top-k {top_k} must be between 1 and --experts {experts}")
    if every < 1 or every > len(kinds):
        raise ConversionError(f"--every {every} must be between 1 and the {len(kinds)} layers")
    new_cfg = copy.deepcopy(cfg)
    new_cfg.model.pattern = ["dense"] * (every - 1) + ["moe"]
    moe = new_cfg.moe
    moe.num_experts, moe.top_k, moe.expert_hidden = experts, top_k, cfg.model.ffn_hidden
    moe.score_func, moe.renormalize, moe.drop_tokens = "softmax", True, False
    moe.num_shared_experts, moe.noisy_gating, moe.bias_balancing = 0, False, False
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if parts[0] == "layers" and new_cfg.model.layer_kinds()[int(parts[1])] == "moe" and parts[2] == "ffn":
            continue
        out[name] = value
    for i, kind in enumerate(new_cfg.model.layer_kinds()):
        if kind != "moe":
            continue
        ffn = f"layers.{i}.ffn"
        gate_up = torch.cat([tensors[f"{ffn}.gate_proj.weight"], tensors[f"{ffn}.up_proj.weight"]], dim=0)
        out[f"{ffn}.experts.gate_up_proj"] = gate_up.unsqueeze(0).repeat(experts, 1, 1).contiguous()
        out[f"{ffn}.experts.down_proj"] = tensors[f"{ffn}.down_proj.weight"].unsqueeze(0).repeat(experts, 1, 1).contiguous()
        d_model = gate_up.shape[1]
        out[f"{ffn}.router.weight"] = torch.randn(experts, d_model, generator=gen) * ROUTER_INIT_STD
    return out, new_cfg
