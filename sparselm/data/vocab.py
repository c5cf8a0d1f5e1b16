"""The embedding's row count: the tokenizer's vocabulary padded for fast matmuls and for tensor parallelism.

One rule, used by the trainer, the FLOP counts, the planner and the tools: ``model.vocab_size=0`` means the
tokenizer's vocabulary rounded up to a multiple of both ``model.pad_vocab_to`` (Megatron-LM's
``make_vocab_size_divisible_by``, 64 or 128 for tensor-core-friendly widths) and ``parallel.tp`` (the
vocabulary-parallel embedding and loss give each tensor-parallel rank an equal slice of rows).
"""
from __future__ import annotations

import math

from sparselm.data.tokenizer import load_tokenizer


def padded_vocab_size(vocab: int, pad_to: int, tp: int) -> int:
    """``vocab`` tokens rounded up to the least common multiple of ``pad_to`` and ``tp`` (rows; >= vocab).
    Raises ValueError when ``pad_to`` or ``tp`` is below 1."""
    if pad_to < 1 or tp < 1:
        raise ValueError(f"pad_to and tp must be >= 1, got pad_to={pad_to}, tp={tp}")
    multiple = math.lcm(pad_to, tp)
    return multiple * math.ceil(vocab / multiple)


def derive_vocab_size(cfg, tokenizer=None) -> None:
    """Set ``cfg.model.vocab_size`` when it is 0 (derive) to ``padded_vocab_size`` of the tokenizer's
    vocabulary; an explicit size is left as it is.  ``tokenizer``: one already loaded, else data.tokenizer
    is loaded (only when the size is derived).  Raises DatasetError when the tokenizer cannot be loaded."""
    m = cfg.model
    if m.vocab_size:
        return
    tokenizer = tokenizer or load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token)
    m.vocab_size = padded_vocab_size(tokenizer.vocab_size, m.pad_vocab_to, cfg.parallel.tp)
