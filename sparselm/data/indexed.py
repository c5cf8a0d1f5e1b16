"""Megatron's indexed dataset format (.bin tokens + .idx index), read and written with megatron-core's
own ``IndexedDatasetBuilder`` / ``IndexedDataset`` so files are interchangeable with Megatron."""
from __future__ import annotations

import os
import secrets
import socket
import struct
from pathlib import Path

import numpy as np
import torch

from sparselm.errors import DatasetError


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size < 65500 else np.int32


def write_indexed(prefix: str | Path, documents, vocab_size: int) -> tuple[int, int]:
    """Write an iterable of token-id sequences (one per document); returns (documents, tokens).

    Written to temporary names and renamed at the end, so an interrupted run never leaves a
    half-written dataset under the final name.  Raises DatasetError, writing nothing under ``prefix``,
    when the documents hold no token at all (a dataset nobody can train on)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(prefix)
    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{prefix}.tmp-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"  # unique across hosts
    dtype = token_dtype(vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    count = tokens = 0
    try:
        for doc in documents:
            builder.add_document(torch.as_tensor(np.asarray(doc, dtype=np.int64)), [len(doc)])
            count += 1
            tokens += len(doc)
        builder.finalize(tmp + ".idx")
        if tokens == 0:
            raise DatasetError(f"no token to write to '{prefix}' ({count} documents, all empty); check --input and "
                               "--json-keys")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        for ext in (".bin", ".idx"):
            if os.path.exists(tmp + ext):
                os.remove(tmp + ext)
    return count, tokens


def open_indexed(prefix: str | Path):
    """Open with megatron-core's reader after checking both files exist and agree in size."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = str(prefix)
    _check_index_header(prefix)
    if os.path.getsize(prefix + ".bin") == 0:
        raise DatasetError(f"dataset '{prefix}' holds no tokens (its .bin is empty); regenerate it with "
                           "tools/preprocess_data.py from input that has text")
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


_INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count


def _check_index_header(prefix: str) -> None:
    """Check that both files exist, and the .idx header and its exact size, before megatron-core's reader
    opens them: its reader asserts on a bad header and, half-constructed, prints destructor tracebacks."""
    for ext in (".bin", ".idx"):
        if not os.path.isfile(prefix + ext):
            raise DatasetError(f"dataset file '{prefix}{ext}' does not exist; create it with tools/preprocess_data.py --output-prefix {prefix}")
    path = prefix + ".idx"
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(_HEADER.size)
    fix = "regenerate it with tools/preprocess_data.py"
    if len(head) < _HEADER.size or head[:9] != _INDEX_MAGIC:
        raise DatasetError(f"dataset index '{path}' is corrupt or not a Megatron index (bad header); {fix}")
    _, version, _, sequences, documents = _HEADER.unpack(head)
    expected = _HEADER.size + sequences * (4 + 8) + documents * 8
    if version != 1 or size not in (expected, expected + sequences):  # + one mode byte per sequence if multimodal
        raise DatasetError(f"dataset index '{path}' is corrupt or not a Megatron index (version {version}, "
                           f"{size} bytes for {sequences} sequences); {fix}")
    if sequences == 0:
        raise DatasetError(f"dataset '{prefix}' holds no tokens (0 documents); regenerate it with "
                           "tools/preprocess_data.py from input that has text")


def document_lengths(prefix: str | Path) -> np.ndarray:
    """Token count of every document, read from the .idx with numpy alone (no megatron-core import), after
    the same checks as ``open_indexed``.  Raises DatasetError naming the file."""
    prefix = str(prefix)
    _check_index_header(prefix)
    sequences = _HEADER.unpack(open(prefix + ".idx", "rb").read(_HEADER.size))[3]
    return np.fromfile(prefix + ".idx", dtype=np.int32, count=sequences, offset=_HEADER.size).astype(np.int64)


def flat_tokens(ds) -> np.ndarray:
    """All tokens of an opened dataset as one read-only memmap (documents in order)."""
    return np.memmap(ds.path_prefix + ".bin", dtype=ds.index.dtype, mode="r")
