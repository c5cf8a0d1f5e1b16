"""Test helpers for PKM: small configs and a dense reference that materialises all n_keys keys."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparselm.config import load_config


def pkm_cfg(*extra, pattern="dense,pkm"):
    """A validated config with small PKM settings (every layer kind that the pattern names)."""
    return load_config("tiny_dense", ["--model.vocab_size=128", "--model.d_model=32", "--model.n_layers=2",
                                      "--model.n_heads=2", f"--model.pattern={pattern}", "--pkm.n_keys=256",
                                      "--pkm.heads=2", "--pkm.knn=4", "--pkm.k_dim=16", *extra])


def full_keys(keys: torch.Tensor) -> torch.Tensor:
    """[heads, 2, n_sub, h] sub-keys -> [heads, n_sub**2, 2h]: key i*n_sub+j = concat(sub1[i], sub2[j])."""
    heads, _, n_sub, half = keys.shape
    k1 = keys[:, 0].unsqueeze(2).expand(heads, n_sub, n_sub, half)
    k2 = keys[:, 1].unsqueeze(1).expand(heads, n_sub, n_sub, half)
    return torch.cat([k1, k2], dim=-1).reshape(heads, n_sub * n_sub, 2 * half)


def dense_memory(module, x: torch.Tensor) -> torch.Tensor:
    """The memory's output computed by scoring every key: no product-key shortcut, no embedding_bag."""
    flat = x.reshape(-1, x.shape[-1])
    q = module.query_norm(F.linear(flat, module.query_weight).view(-1, module.heads, module.k_dim))
    scores = torch.einsum("nhd,hkd->nhk", q, full_keys(module.keys))
    top, slots = scores.topk(module.knn, dim=-1)
    weights = torch.softmax(top, dim=-1)
    memory = (weights.unsqueeze(-1) * module.values[slots]).sum(dim=(1, 2))
    if module.gate_weight is not None:
        memory = memory * F.silu(F.linear(flat, module.gate_weight))
    if module.out_weight is not None:
        memory = F.linear(memory, module.out_weight)
    return memory.view(*x.shape[:-1], -1)
