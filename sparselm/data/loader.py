"""Turn data config into packed train/validation samples."""
from __future__ import annotations

import zlib

import numpy as np

from sparselm.data.corpus import build_default_corpus
from sparselm.data.indexed import flat_tokens, open_indexed
from sparselm.data.packing import PackedSamples


def _packed(prefix: str, seq_len: int, keep=None) -> PackedSamples:
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
        return _packed(train_prefix, dcfg.seq_len), _packed(valid_prefix, dcfg.seq_len)
    if dcfg.valid_dataset:
        return _packed(dcfg.dataset, dcfg.seq_len), _packed(dcfg.valid_dataset, dcfg.seq_len)
    held_out = lambda i: zlib.crc32(str(i).encode()) % 10_000 < dcfg.valid_fraction * 10_000  # noqa: E731
    return (_packed(dcfg.dataset, dcfg.seq_len, keep=lambda i: not held_out(i)),
            _packed(dcfg.dataset, dcfg.seq_len, keep=held_out))
