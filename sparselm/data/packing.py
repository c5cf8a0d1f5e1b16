"""Fixed-length samples packed from a chosen set of documents.

Documents (each ending with end-of-document when preprocessed with --append-eod) are laid end to end;
sample i is tokens [i*L, i*L + L + 1) of that stream: L inputs and the L next-token labels.
"""
from __future__ import annotations

import numpy as np


class PackedSamples:
    def __init__(self, tokens: np.ndarray, doc_offsets: np.ndarray, doc_lengths: np.ndarray, seq_len: int):
        self.tokens = tokens
        self.offsets = np.asarray(doc_offsets, dtype=np.int64)
        self.lengths = np.asarray(doc_lengths, dtype=np.int64)
        self.cum = np.concatenate([[0], np.cumsum(self.lengths)])
        self.seq_len = seq_len
        total = int(self.cum[-1])
        self.num_samples = max(0, (total - 1) // seq_len)  # as sparselm.data.loader.packed_samples

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_samples:
            raise IndexError(i)
        start, stop = i * self.seq_len, i * self.seq_len + self.seq_len + 1
        first = int(np.searchsorted(self.cum, start, side="right")) - 1
        pieces, pos, doc = [], start, first
        while pos < stop:
            within = pos - self.cum[doc]
            take = min(stop - pos, self.lengths[doc] - within)
            pieces.append(self.tokens[self.offsets[doc] + within: self.offsets[doc] + within + take])
            pos += take
            doc += 1
        return np.concatenate(pieces).astype(np.int64)

    def batch(self, indices) -> np.ndarray:
        return np.stack([self[int(i)] for i in indices]) if len(indices) else np.zeros((0, self.seq_len + 1), np.int64)
