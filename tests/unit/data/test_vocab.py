"""sparselm.data.vocab: the one padding rule of the embedding's rows."""
import pytest

from sparselm.config import load_config
from sparselm.data.tokenizer import load_tokenizer
from sparselm.data.vocab import derive_vocab_size, padded_vocab_size


def test_padding_is_a_multiple_of_pad_to_and_tp():
    assert padded_vocab_size(257, 64, 1) == 320
    assert padded_vocab_size(257, 64, 3) == 384  # lcm(64, 3) = 192
    assert padded_vocab_size(320, 64, 2) == 320
    with pytest.raises(ValueError, match="tp"):
        padded_vocab_size(257, 64, 0)


def test_derive_sets_only_a_zero_size():
    cfg = load_config("tiny_dense", ["--model.vocab_size=0", "--parallel.tp=1"], check=False)
    derive_vocab_size(cfg)
    tokens = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token).vocab_size
    assert cfg.model.vocab_size == padded_vocab_size(tokens, cfg.model.pad_vocab_to, 1)
    cfg.model.vocab_size = 1000
    derive_vocab_size(cfg)
    assert cfg.model.vocab_size == 1000
