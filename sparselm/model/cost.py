"""The cost model of a block kind: plain arithmetic on the config, registered with the kind
(``registry.register_block(name, cost=...)``) and read by every consumer that needs a kind's size:
``sparselm.planning.flops`` (parameters and FLOPs per token), the planner (activation memory, matmul outputs
kept by selective recomputation, tensor-parallel and expert communication) and
``sparselm.parallel.layout`` (the widths tensor parallelism splits).

A block is pre-norm attention followed by an optional feed-forward slot (``registry``).  ``BlockCost`` counts
the attention part once for every kind (q/k/v/o projections with optional bias and query/key norm,
persistent memory slots where ``memory_slots`` says so, the RMSNorm weights); a kind's subclass describes
its slot.  Units: parameters and elements are counts; FLOPs are forward FLOPs of one token, a multiply-add
counted as 2 (Kaplan et al. 2020, section 2.1); activation elements are per token of one micro-batch on one
tensor-parallel rank, in the activations' precision (``act_bytes`` bytes each: fp32 tensors count
``4 / act_bytes`` elements).  No torch here: the config is all a cost function reads.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from sparselm.model.mla_cost import (
    latent_activations,
    latent_core_flops,
    latent_matmul_outputs,
    latent_params,
    latent_weights,
)

SINK_CHANNELS = 8
"""The sinks' score width per head is padded to a multiple of this (``sparselm.model.sinks.CHANNEL_MULTIPLE``;
not imported: no torch here)."""


def swiglu_params(d: int, hidden: int) -> int:
    """Weights of a bias-free SwiGLU of width ``d`` and ``hidden`` hidden units: gate, up and down (Shazeer 2020)."""
    return 3 * d * hidden


def swiglu_activations(hidden: int, tp: int) -> float:
    """Elements per token a SwiGLU saves for backward besides its input: gate, up, silu(gate) and their
    product, each ``hidden / tp`` wide on a tensor-parallel rank."""
    return 4 * hidden / tp


def swiglu_matmul_outputs(d: int, hidden: int, tp: int) -> float:
    """Elements per token of a SwiGLU's weight-matmul outputs (gate and up per rank, down all ``d``): what
    selective recomputation keeps."""
    return 2 * hidden / tp + d


def attention_params(cfg, memory: int) -> dict[str, int]:
    """Parameters of one block's attention: ``attention_proj`` (q/k/v/o weights, the qkv bias when
    model.qkv_bias, the output bias when model.o_bias, the query/key norm weights of model.qk_norm, one sink
    per query head when model.attention_sinks) and ``attention_memory`` (``memory`` persistent key and value
    slots per key/value head, Sukhbaatar et al. 2019)."""
    m = cfg.model
    if m.attention == "mla":  # no persistent memory (config validation)
        return {"attention_proj": latent_params(m), "attention_memory": 0}
    d, kv = m.n_heads * m.head_width, m.kv_heads * m.head_width
    proj = 2 * m.d_model * d + 2 * m.d_model * kv
    norm = {"per_head": 2 * m.head_width, "full": d + kv}.get(m.qk_norm, 0)
    extra = ((d + 2 * kv) if m.qkv_bias else 0) + (m.d_model if m.o_bias else 0) + (m.n_heads if m.attention_sinks else 0)
    return {"attention_proj": proj + extra + norm,
            "attention_memory": 2 * m.kv_heads * memory * m.head_width}


def attention_flops(cfg, memory: int, keys: float, seq_len: int, mode: str = "pattern") -> dict[str, float]:
    """Forward FLOPs per token of one block's attention: the projections, and the core (scores and weighted
    values, 4 FLOPs per query channel and key; the query width is n_heads * head_dim).  ``mode='pattern'``:
    model FLOPs, ``keys`` context keys visible to a query on average plus the ``memory`` slots;
    ``'executed_dense'``: the masked dense SDPA of the CPU reference path (every query against all
    ``seq_len`` keys and the memory, memory queries doubling the score width: sparse_attention.kernels.
    append_memory; learned sinks add one key, on causal SDPA one padding query too, and widen each head's
    queries, keys and values to the next multiple of ``sinks.CHANNEL_MULTIPLE`` channels), ``keys`` unused.  The sinks' one logit per head and the biases'
    additions are not matmul FLOPs and are not counted.  Raises ValueError for another mode."""
    m = cfg.model
    if mode not in ("pattern", "executed_dense"):
        raise ValueError(f"attention must be 'pattern' or 'executed_dense', got {mode!r}")
    if m.attention == "mla":  # causal or sliding, no memory: the executed dense SDPA sees all seq_len keys
        return {"attention_proj": 2 * latent_weights(m),
                "attention_core": latent_core_flops(m, keys) if mode == "pattern" else
                latent_core_flops(m, seq_len, padded=True)}
    dm, d, kv = m.d_model, m.n_heads * m.head_width, m.kv_heads * m.head_width
    proj = 2 * dm * d + 2 * dm * kv
    if mode == "pattern":
        core = 4 * d * (keys + memory)
    elif mode == "executed_dense":
        total = seq_len + memory
        sparse_path = memory > 0 or cfg.attention.pattern != "causal"
        core = (2 * d * (2 if memory else 1) + 2 * d) * total if sparse_path else 4 * d * seq_len
        if m.attention_sinks:  # one more key, each head's scores widened to a multiple of SINK_CHANNELS
            per_head = m.head_width * (2 if memory else 1)
            width = m.n_heads * (per_head + -(per_head + 1) % SINK_CHANNELS + 1)
            # causal SDPA: the sink key in front and one padding query row, (T + 1)^2 scores for T tokens
            core = 4 * width * ((total + 1) if sparse_path else (seq_len + 1) ** 2 / seq_len)  # values padded alike
    else:
        raise ValueError(f"attention must be 'pattern' or 'executed_dense', got {mode!r}")
    return {"attention_proj": 2 * proj, "attention_core": core}


class BlockCost:
    """What one block of a kind costs.  Subclasses override the ``slot_*`` methods (and ``memory_slots``,
    ``has_slot``, ``tp_widths``, ``routed_copies`` where they differ); the whole-block methods add the
    attention part every kind shares.  Every method is arithmetic on a resolved config."""

    has_slot: bool = True
    """Whether the block has a feed-forward slot (and so a second norm and a second row-parallel output)."""

    def memory_slots(self, cfg) -> int:
        """Persistent key/value slots of the block's attention (0: none)."""
        return 0

    # ------------------------------------------------------------------ the slot, per kind
    def slot_params(self, cfg, layer_idx: int) -> tuple[int, int]:
        """(total, active per token) parameters of the feed-forward slot of layer ``layer_idx``."""
        raise NotImplementedError(f"{type(self).__name__} has no slot_params")

    def slot_flops(self, cfg, layer_idx: int) -> dict[str, float]:
        """Forward FLOPs per token of the slot by component (ffn, moe_router, moe_shared, moe_experts,
        pkm_query, pkm_subkeys, pkm_topk, pkm_values, pkm_proj)."""
        raise NotImplementedError(f"{type(self).__name__} has no slot_flops")

    def slot_activations(self, cfg, tp: int, act_bytes: int) -> float:
        """Elements per token the slot saves for backward besides its norm (tensor-parallel rank)."""
        raise NotImplementedError(f"{type(self).__name__} has no slot_activations")

    def slot_matmul_outputs(self, cfg, tp: int, act_bytes: int) -> float:
        """Elements per token of the slot's weight-matmul outputs (kept by selective recomputation)."""
        raise NotImplementedError(f"{type(self).__name__} has no slot_matmul_outputs")

    def tp_widths(self, cfg) -> list[tuple[int, str]]:
        """(hidden width, the setting that gives it) of every SwiGLU of the slot that tensor parallelism
        splits by hidden units; each must divide by parallel.tp."""
        return []

    def routed_copies(self, cfg) -> int:
        """Copies of each token the slot sends to experts over expert parallelism (0: no routing)."""
        return 0

    # ------------------------------------------------------------------ the whole block
    def params(self, cfg, layer_idx: int) -> tuple[int, int]:
        """(total, active per token) parameters of block ``layer_idx``: attention, its memory, the norms and
        the slot (a table shared between layers counted where it is held)."""
        attn = sum(attention_params(cfg, self.memory_slots(cfg)).values()) + cfg.model.d_model * (1 + self.has_slot)
        total, active = self.slot_params(cfg, layer_idx) if self.has_slot else (0, 0)
        return attn + total, attn + active

    def forward_flops(self, cfg, layer_idx: int, keys: float, seq_len: int, mode: str = "pattern") -> dict[str, float]:
        """Forward FLOPs per token of block ``layer_idx`` by component (``attention_flops`` for ``keys``,
        ``seq_len`` and ``mode``, plus the slot's)."""
        flops = attention_flops(cfg, self.memory_slots(cfg), keys, seq_len, mode)
        if self.has_slot:
            for name, value in self.slot_flops(cfg, layer_idx).items():
                flops[name] = flops.get(name, 0) + value
        return flops

    def activation_elems(self, cfg, tp: int, act_bytes: int) -> float:
        """Elements per token one block saves for backward on a tensor-parallel rank of ``tp``: the norm's
        input and output; q and k before and after rotary, v, the attention output (flash/flex kernels keep no
        scores; persistent memory adds its keys and values to every sequence of data.seq_len); then the slot's
        norm input and output and ``slot_activations``."""
        m = cfg.model
        d, qd, kvd = m.d_model, m.n_heads * m.head_width, m.kv_heads * m.head_width
        if m.attention == "mla":
            attn = 2 * d + latent_activations(m, tp)
        else:
            attn = 2 * d + (3 * qd + 3 * kvd) / tp + 2 * kvd * self.memory_slots(cfg) / cfg.data.seq_len / tp
        if not self.has_slot:
            return attn
        return attn + (2 * d + self.slot_activations(cfg, tp, act_bytes))

    def matmul_elems(self, cfg, tp: int, act_bytes: int) -> float:
        """Elements per token of the block's weight-matmul outputs (q, k, v and output projections, the slot's
        ``slot_matmul_outputs``) plus its input: what a selectively recomputed block keeps."""
        m = cfg.model
        d, qd, kvd = m.d_model, m.n_heads * m.head_width, m.kv_heads * m.head_width
        keep = d + (latent_matmul_outputs(m, tp) if m.attention == "mla" else (qd + 2 * kvd) / tp + d)
        return keep + self.slot_matmul_outputs(cfg, tp, act_bytes) if self.has_slot else keep

    def tp_all_reduces(self) -> int:
        """Row-parallel outputs tensor parallelism all-reduces per forward: attention's and the slot's."""
        return 1 + self.has_slot


@dataclass(frozen=True)
class SwiGLUCost(BlockCost):
    """A dense SwiGLU slot of ``hidden(cfg)`` hidden units (kind ``dense``: model.d_ff)."""

    hidden: Callable = lambda cfg: cfg.model.ffn_hidden
    """cfg -> the slot's hidden units."""
    setting: str = "model.d_ff"
    """The setting that gives the width, named when tensor parallelism cannot split it."""

    def slot_params(self, cfg, layer_idx: int) -> tuple[int, int]:
        """(total, active per token): every weight of the SwiGLU, all active."""
        n = swiglu_params(cfg.model.d_model, self.hidden(cfg))
        return n, n

    def slot_flops(self, cfg, layer_idx: int) -> dict[str, float]:
        """Forward FLOPs per token: ffn, 2 per weight."""
        return {"ffn": 2 * swiglu_params(cfg.model.d_model, self.hidden(cfg))}

    def slot_activations(self, cfg, tp: int, act_bytes: int) -> float:
        """``swiglu_activations`` of the slot's width."""
        return swiglu_activations(self.hidden(cfg), tp)

    def slot_matmul_outputs(self, cfg, tp: int, act_bytes: int) -> float:
        """``swiglu_matmul_outputs`` of the slot's width."""
        return swiglu_matmul_outputs(cfg.model.d_model, self.hidden(cfg), tp)

    def tp_widths(self, cfg) -> list[tuple[int, str]]:
        """The slot's hidden width, split by tensor parallelism."""
        return [(self.hidden(cfg), self.setting)]
