"""Block kinds ``pkm`` (memory replaces the feed-forward) and ``pkm_ffn`` (memory beside a dense FFN),
and the binding of value tables shared between layers."""
from __future__ import annotations

import math

import torch
from torch import nn

from sparselm.model.feedforward import SwiGLU
from sparselm.model.pkm.cost import PKMCost
from sparselm.model.pkm.memory import ProductKeyMemory
from sparselm.model.registry import default_attention, register_block


def build_memory(cfg, layer_idx: int) -> ProductKeyMemory:
    """The memory of layer ``layer_idx``; a layer of ``pkm.share_values`` other than the first reads the
    first one's table (bound later by ``bind_shared_values``)."""
    shared = cfg.pkm.share_values
    owner = shared[0] if layer_idx in shared and layer_idx != shared[0] else None
    std = cfg.model.init_std
    return ProductKeyMemory(cfg.model.d_model, cfg.pkm, init_std=std, out_std=std / math.sqrt(2 * cfg.model.n_layers),
                            shared_from=owner)


class MemoryBesideFFN(nn.Module):
    """y = ffn(x) + memory(x): both read the same normalised input."""

    def __init__(self, ffn: nn.Module, memory: ProductKeyMemory):
        super().__init__()
        self.ffn = ffn
        self.memory = memory

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ffn(x) + self.memory(x)


@register_block("pkm", cost=PKMCost())
def pkm_block(cfg, layer_idx: int):
    return default_attention(cfg, layer_idx), build_memory(cfg, layer_idx)


@register_block("pkm_ffn", cost=PKMCost(with_ffn=True))
def pkm_ffn_block(cfg, layer_idx: int):
    ffn = SwiGLU(cfg.model.d_model, cfg.model.ffn_hidden)
    return default_attention(cfg, layer_idx), MemoryBesideFFN(ffn, build_memory(cfg, layer_idx))


def bind_shared_values(layers) -> None:
    """Point every memory that shares a table at its owner's Parameter (call once the layers exist)."""
    for block in layers:
        for module in block.modules():
            if isinstance(module, ProductKeyMemory):
                module.bind_shared(layers)
