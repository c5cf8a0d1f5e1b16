"""Tokenizers: a file-free byte-level default and BPE trained locally with Hugging Face `tokenizers`.

A tokenizer spec is the string in ``data.tokenizer``: ``byte`` or the path of a tokenizer.json.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from sparselm.errors import DatasetError

EOD_TOKEN = "<|endoftext|>"
# End-of-document tokens of imported (Hugging Face) tokenizers.
OTHER_EOD_TOKENS = ("</s>", "<|end_of_text|>", "<eos>")


class ByteTokenizer:
    """UTF-8 bytes are token ids 0..255; id 256 is end-of-document."""

    name = "byte"
    vocab_size = 257
    eod_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class BPETokenizer:
    """Any tokenizers-library tokenizer.json: one trained by ``train_bpe``, or one saved by transformers.

    The end-of-document token is ``eod_token`` when given, else the eos_token of a tokenizer_config.json
    beside the file, else the first of <|endoftext|>, </s>, <|end_of_text|>, <eos> the vocabulary holds.
    Raises DatasetError when none is found or the named one is not in the vocabulary."""

    def __init__(self, path: str | Path, eod_token: str = ""):
        from tokenizers import Tokenizer

        self.path = Path(path)
        self._tok = Tokenizer.from_file(str(self.path))
        candidates = [eod_token] if eod_token else [*_config_eos(self.path), EOD_TOKEN, *OTHER_EOD_TOKENS]
        found = [self._tok.token_to_id(t) for t in candidates]
        eod = next((i for i in found if i is not None), None)
        if eod is None:
            named = f"data.eod_token '{eod_token}' is not in its vocabulary" if eod_token else (
                f"it has no end-of-document token ({', '.join(candidates)})")
            raise DatasetError(f"tokenizer '{path}': {named}; set data.eod_token to the text of its end-of-document "
                               "token, or train one with tools/train_tokenizer.py")
        self.eod_id = eod
        self.vocab_size = self._tok.get_vocab_size()
        digest = hashlib.sha256(self.path.read_bytes() + eod_token.encode()).hexdigest()[:12]
        self.name = "bpe-" + digest

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids if int(i) != self.eod_id])


def _config_eos(path: Path) -> list[str]:
    """The eos_token of a transformers tokenizer_config.json beside ``path``, if any."""
    config = path.parent / "tokenizer_config.json"
    try:
        eos = json.loads(config.read_text()).get("eos_token") if config.is_file() else None
    except (OSError, ValueError):
        return []
    if isinstance(eos, dict):  # an AddedToken written out
        eos = eos.get("content")
    return [eos] if isinstance(eos, str) and eos else []


def load_tokenizer(spec: str, eod_token: str = ""):
    """'byte' or a tokenizer.json path (``eod_token``: data.eod_token) -> tokenizer."""
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file '{spec}' does not exist; use data.tokenizer=byte or train one with tools/train_tokenizer.py")
    return BPETokenizer(path, eod_token)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (the alphabet of byte-level pre-tokenizers)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def tokenizer_json(tokenizer) -> str:
    """A Hugging Face ``tokenizer.json`` that encodes exactly as ``tokenizer`` does: the BPE file itself, or
    for the byte tokenizer a byte-level model whose 256 single-byte tokens have ids 0-255 and no merges,
    plus the end-of-document token at 256."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.path.read_text(encoding="utf-8")
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {char: b for b, char in _byte_to_unicode().items()}
    vocab[EOD_TOKEN] = tokenizer.eod_id
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOD_TOKEN, special=True)])
    return tok.to_str()


def eod_token(tokenizer) -> str:
    """The text of the end-of-document token."""
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer._tok.id_to_token(tokenizer.eod_id)
    return EOD_TOKEN


def train_bpe(texts, vocab_size: int, out_path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE on an iterable of strings and save tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD_TOKEN],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(out_path))
    return BPETokenizer(out_path)
