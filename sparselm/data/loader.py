"""Turn data config into packed train/validation samples."""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from sparselm.data.blend import BlendedSamples, is_blend, parse_blend
from sparselm.data.corpus import build_default_corpus
from sparselm.data.indexed import document_lengths, flat_tokens, open_indexed
from sparselm.data.packing import PackedSamples
from sparselm.errors import DatasetError


def pack_dataset(prefix: str, seq_len: int, keep=None) -> PackedSamples:
    ds = open_indexed(prefix)
    lengths = np.asarray(ds.sequence_lengths, dtype=np.int64)
    offsets = np.asarray(ds.index.sequence_pointers, dtype=np.int64) // np.dtype(ds.index.dtype).itemsize
    if keep is not None:
        mask = np.array([keep(i) for i in range(len(lengths))], dtype=bool)
        lengths, offsets = lengths[mask], offsets[mask]
    return PackedSamples(flat_tokens(ds), offsets, lengths, seq_len)


def build_blend(dcfg, tokenizer, size: int, seed: int):
    """(BlendedSamples for training, {source name: validation PackedSamples}).  Validation: the sources of
    data.valid_dataset (a prefix or a blend), else each training source's held-out documents."""
    sources = parse_blend(dcfg.dataset)
    held = lambda i: held_out(i, dcfg.valid_fraction)  # noqa: E731
    keep = None if dcfg.valid_dataset else (lambda i: not held(i))
    train = BlendedSamples(sources, [pack_dataset(s.prefix, dcfg.seq_len, keep=keep) for s in sources], size, seed,
                           dcfg.allow_repeat)
    if dcfg.valid_dataset:
        valid = {s.name: pack_dataset(s.prefix, dcfg.seq_len) for s in parse_blend(dcfg.valid_dataset, "data.valid_dataset")}
    else:
        valid = {s.name: pack_dataset(s.prefix, dcfg.seq_len, keep=held) for s in sources}
    return train, valid


def dataset_meta(prefix: str) -> dict | None:
    """What tools/preprocess_data.py recorded beside a dataset (PREFIX.meta.json: tokenizer, vocab_size,
    eod_id), or None for files made elsewhere (e.g. by Megatron's own tools)."""
    path = Path(f"{prefix}.meta.json")
    return json.loads(path.read_text()) if path.is_file() else None


def check_dataset_tokenizer(dcfg, tokenizer) -> None:
    """Every dataset (each source of a blend) was tokenized by the run's tokenizer, as far as its
    PREFIX.meta.json records it.  Raises DatasetError naming the source."""
    for key, spec in (("data.dataset", dcfg.dataset), ("data.valid_dataset", dcfg.valid_dataset)):
        for source in parse_blend(spec, key):
            meta = dataset_meta(source.prefix)
            if meta is not None and meta.get("tokenizer") != tokenizer.name:
                raise DatasetError(
                    f"{key} source '{source.name}' ({source.prefix}) was tokenized with the {meta.get('tokenizer')} "
                    f"tokenizer (vocabulary {meta.get('vocab_size')}), but this run uses {tokenizer.name} "
                    f"(vocabulary {tokenizer.vocab_size}); preprocess every source with data.tokenizer")


def build_datasets(dcfg, tokenizer) -> tuple[PackedSamples, PackedSamples]:
    """(train, valid) packed samples for a data config naming one dataset (see build_blend for mixtures)."""
    if dcfg.dataset == "default":
        train_prefix, valid_prefix = build_default_corpus(tokenizer, dcfg.valid_fraction, dcfg.cache_dir)
        return pack_dataset(train_prefix, dcfg.seq_len), pack_dataset(dcfg.valid_dataset or valid_prefix, dcfg.seq_len)
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
    the default corpus, which is built on first use, and for a blend (each source's files are checked;
    the trainer names a source that runs out)."""
    if is_blend(dcfg.dataset):
        for source in parse_blend(dcfg.dataset):
            document_lengths(source.prefix)
        return None
    if dcfg.dataset == "default":
        return None
    lengths = document_lengths(dcfg.dataset)
    if not dcfg.valid_dataset:
        lengths = lengths[[not held_out(i, dcfg.valid_fraction) for i in range(len(lengths))]]
    return packed_samples(int(lengths.sum()), dcfg.seq_len)
