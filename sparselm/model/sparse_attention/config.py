"""The ``attention`` config section: the pattern every layer uses and the persistent memory size."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from sparselm.errors import require


@dataclass
class AttentionConfig:
    """Attention in every block: sparse pattern, persistent memory slots (all-attention), backend."""

    pattern: Literal["causal", "sliding_window", "strided", "fixed", "block_local", "bigbird"] = "causal"
    """Attention pattern of every layer: causal (dense, SDPA), sliding_window, strided, fixed, block_local or bigbird."""
    window: int = 256
    """sliding_window: tokens each query sees, itself included; at most data.seq_len."""
    stride: int = 128
    """strided: width of the local band and distance between strided columns; fixed: block length (Child et al.'s l)."""
    summary: int = 16
    """fixed: the last `summary` tokens of every block are visible to all later queries (Child et al.'s c)."""
    block: int = 64
    """block_local and bigbird: block size in tokens; must divide data.seq_len."""
    global_blocks: int = 1
    """bigbird: the first global_blocks blocks are visible to every later query."""
    window_blocks: int = 2
    """bigbird: a query sees its own block and the window_blocks - 1 blocks before it."""
    random_blocks: int = 2
    """bigbird: earlier blocks each query block sees at random (fixed per block by `seed`)."""
    seed: int = 0
    """bigbird: seed of the random blocks (the same in every layer and run)."""
    persistent_slots: int = 0
    """Persistent key/value vectors per kv head in 'allattn' blocks; 0 means as many as keep the
    parameter count of the SwiGLU feed-forward they replace (3 * d_model * ffn_hidden / (2 * kv width))."""
    memory_lr_scale: float = 1.0
    """Learning-rate multiplier of the persistent keys and values (their own optimizer group,
    'persistent_memory').  Under Adam the paper's reparametrisation (k = sqrt(d_h) U_k, v = sqrt(N) U_v)
    already moves the used vectors sqrt(d_h) and sqrt(N) times faster than U; values below 1 undo that."""
    backend: Literal["auto", "flex", "reference", "block_sparse"] = "auto"
    """auto (compiled FlexAttention on CUDA, exact masked SDPA elsewhere), flex, reference (masked SDPA)
    or block_sparse (exact, computes only the key blocks a query block can see; for long sequences on CPU)."""


def memory_slots(cfg) -> int:
    """Persistent slots of an 'allattn' block under this config (resolves the 0 default)."""
    if cfg.attention.persistent_slots:
        return cfg.attention.persistent_slots
    m = cfg.model
    return math.ceil(3 * m.d_model * m.ffn_hidden / (2 * m.kv_heads * m.head_width))


def validate_attention(cfg) -> None:
    a, seq = cfg.attention, cfg.data.seq_len
    require(a.persistent_slots >= 0, f"attention.persistent_slots must be >= 0, got {a.persistent_slots}")
    require(a.memory_lr_scale > 0, f"attention.memory_lr_scale must be positive, got {a.memory_lr_scale}")
    if a.pattern == "sliding_window":
        require(1 <= a.window <= seq, f"attention.window={a.window} must be between 1 and the sequence length data.seq_len={seq}; lower the window (or use pattern causal)")
    if a.pattern in ("strided", "fixed"):
        require(1 <= a.stride <= seq, f"attention.stride={a.stride} must be between 1 and the sequence length data.seq_len={seq}")
    if a.pattern == "fixed":
        require(1 <= a.summary <= a.stride, f"attention.summary={a.summary} must be between 1 and attention.stride={a.stride}")
    if a.pattern in ("block_local", "bigbird"):
        require(a.block >= 1 and seq % a.block == 0, f"attention.block={a.block} does not divide the sequence length data.seq_len={seq}; pick a divisor of {seq}")
    if a.pattern == "bigbird":
        require(a.global_blocks >= 0 and a.random_blocks >= 0, "attention.global_blocks and attention.random_blocks must be >= 0")
        require(a.window_blocks >= 1, f"attention.window_blocks must be >= 1 (a query sees its own block), got {a.window_blocks}")
