"""Attention under a sparse pattern, optionally with persistent memory (Sukhbaatar et al. 2019)."""
from __future__ import annotations

import torch
from torch import nn

from sparselm.model.attention import Attention
from sparselm.model.sparse_attention.kernels import sparse_attention
from sparselm.model.sparse_attention.patterns import PatternSpec


class SparseAttention(Attention):
    """``Attention`` whose core runs `acfg.pattern` over the context plus `memory_slots` learned
    key/value vectors per kv head.  The memory has no position (neither it nor the query that scores it is
    rotated) and is visible to every query.

    Memory is kept as parameters U of this module and used as k = sqrt(d_h) U_k, v = sqrt(N) U_v with
    U_k ~ N(0, 1/d_h), U_v ~ N(0, 1/N) (the paper's reparametrisation: unit-variance vectors whose
    parameters start at the scale of the other weights).  Tensor parallelism slices dim 0 (kv heads).
    """

    def __init__(self, mcfg, acfg, memory_slots: int = 0):
        super().__init__(mcfg)
        self.spec = PatternSpec.from_config(acfg)
        self.backend = acfg.backend
        self.memory_slots = memory_slots
        if memory_slots:
            shape = (mcfg.kv_heads, memory_slots, mcfg.head_width)
            self.memory_k = nn.Parameter(torch.empty(shape))
            self.memory_v = nn.Parameter(torch.empty(shape))
            for p in (self.memory_k, self.memory_v):
                p.optim_group = "persistent_memory"
                p.optim_overrides = {"lr_scale": acfg.memory_lr_scale}
        else:
            self.register_parameter("memory_k", None)
            self.register_parameter("memory_v", None)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The memory and the sinks: the model initialises the projections before calling this."""
        super().reset_parameters()
        if self.memory_k is not None:
            nn.init.normal_(self.memory_k, 0.0, self.head_dim**-0.5)
            nn.init.normal_(self.memory_v, 0.0, self.memory_slots**-0.5)

    def memory(self):
        """(keys, values), each [kv_heads, N, head_dim], or None."""
        if self.memory_k is None:
            return None
        return self.memory_k * self.head_dim**0.5, self.memory_v * self.memory_slots**0.5

    def attend(self, q, k, v) -> torch.Tensor:
        """Context keys are scored against the rotated query, memory keys against the query before
        rotary: with rotary on the query alone a memory lookup would turn with the query's position."""
        memory = self.memory()
        return sparse_attention(self.rotary(q), self.rotary(k), v, self.spec, memory, self.backend,
                                memory_query=None if memory is None else q, sinks=self.head_sinks())

    def extra_repr(self) -> str:
        return f"pattern={self.spec.name}, memory_slots={self.memory_slots}, backend={self.backend}"
