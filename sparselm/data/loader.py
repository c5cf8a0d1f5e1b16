"""Turn data config into packed train/validation samples."""
from __future__ import annotations

import zlib

import numpy as np

from sparselm.data.corpus import build_default_corpus
from sparselm.data.indexed import document_lengths, flat_tokens, open_indexed
from sparselm.data.packing import PackedSamples


def pack_dataset(prefix: str, seq_len: int, keep=None) -> PackedSamples:
    ds = open_indexed(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    offsets = np.asarray(ds.index.sequence_pointers, dtype=np.int64) // np.dtype(ds.index.dtype).itemsize
    if keep is not None:
        mask = np.array([keep(i) for i in range(len(lengths))], dtype=bool)
        lengths, offsets = lengths[mask], offsets[mask]
    return PackedSamples(flat_tokens(ds), offsets, lengths, seq_len)


def build_datasets(dcfg, tokenizer) -> tuple[PackedSamples, PackedSamples]:
    """(train, valid) packed samples for the data config."""
    if dcfg.dataset == "default":
        train_prefix, valid_prefix = build_default_corpus(tokenizer, dcfg.valid_fraction, dcfg.cache_dir)
        return pack_dataset(train_prefix, dcfg.seq_len), pack_dataset(valid_prefix, dcfg.seq_len)
    if dcfg.valid_dataset:
        return pack_dataset(dcfg.dataset, dcfg.seq_len), pack_dataset(dcfg.valid_dataset, dcfg.seq_len)
    held = lambda i: held_out(i, dcfg.valid_fraction)  # noqa: E731
    return (pack_dataset(dcfg.dataset, dcfg.seq_len, keep=lambda i: not held(i)),
            pack_dataset(dcfg.dataset, dcfg.seq_len, keep=held))


def held_out(document: int, valid_fraction: float) -> bool:
    """Whether document ``document`` of a dataset without data.valid_dataset is held out for validation."""
    return zlib.crc32(str(document).encode()) % 10_000 < valid_fraction * 10_000


def packed_samples(total_tokens: int, seq_len: int) -> int:
    """Samples of seq_len inputs (+1 label) that ``total_tokens`` packed tokens make (as PackedSamples)."""
    return max(0, (total_tokens - 1) // seq_len)


def train_samples_on_disk(dcfg) -> int | None:
    """Training samples of a user dataset counted from its .idx alone (no megatron-core import); None for
    the default corpus, which is built on first use."""
    if dcfg.dataset == "default":
        return None
    lengths = document_lengths(dcfg.dataset)
    if not dcfg.valid_dataset:
        lengths = lengths[[not held_out(i, dcfg.valid_fraction) for i in range(len(lengths))]]
    return packed_samples(int(lengths.sum()), dcfg.seq_len)
