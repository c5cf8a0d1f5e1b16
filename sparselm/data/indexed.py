"""Megatron's indexed dataset format (.bin tokens + .idx index), read and written with megatron-core's
own ``IndexedDatasetBuilder`` / ``IndexedDataset`` so files are interchangeable with Megatron."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np


class DatasetError(ValueError):
    """A dataset file is missing or unreadable; the message names it and the fix."""


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


def write_indexed(prefix: str | Path, documents, vocab_size: int) -> int:
    """Write an iterable of token-id sequences (one per document); returns the document count.

    Written to temporary names and renamed at the end, so an interrupted run never leaves a
    half-written dataset under the final name."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp{os.getpid()}"
    dtype = token_dtype(vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    count = 0
    for doc in documents:
        builder.add_document(torch.as_tensor(np.asarray(doc, dtype=np.int64)), [len(doc)])
        count += 1
    builder.finalize(tmp + ".idx")
    os.replace(tmp + ".bin", prefix + ".bin")
    os.replace(tmp + ".idx", prefix + ".idx")
    return count


def open_indexed(prefix: str | Path):
    """Open with megatron-core's reader after checking both files exist and agree in size."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(prefix)
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DatasetError(f"dataset file '{prefix}{ext}' does not exist; create it with tools/preprocess_data.py --output-prefix {prefix}")
    try:
        ds = IndexedDataset(prefix)
        lengths = ds.sequence_lengths
        pointers = ds.index.sequence_pointers
        itemsize = np.dtype(ds.index.dtype).itemsize
    except Exception as err:  # megatron raises assorted errors on a damaged index
        raise DatasetError(f"dataset index '{prefix}.idx' is corrupt or not a Megatron index ({type(err).__name__}: {err}); regenerate it with tools/preprocess_data.py") from None
    expected = int(pointers[-1]) + int(lengths[-1]) * itemsize if len(lengths) else 0
    actual = os.path.getsize(prefix + ".bin")
    if actual != expected:
        raise DatasetError(f"dataset '{prefix}.bin' holds {actual} bytes but its .idx describes {expected}; the pair is truncated or mismatched, regenerate it with tools/preprocess_data.py")
    return ds


def flat_tokens(ds) -> np.ndarray:
    """All tokens of an opened dataset as one read-only memmap (documents in order)."""
    return np.memmap(ds.path_prefix + ".bin", dtype=ds.index.dtype, mode="r")
