"""A run's own BPE tokenizer and dataset, made locally (nothing is downloaded): the tests of self-contained and
verified checkpoints train on it."""
from __future__ import annotations

from pathlib import Path

from sparselm.data.tokenizer import train_bpe
from tools.preprocess_data import main as preprocess

TEXT = "def add(a, b):\n    return a + b\n\nclass Point:\n    x = 0\n" * 60


def bpe_dataset(root: Path) -> str:
    """Train a 300-token BPE tokenizer into ROOT/tok/tokenizer.json on a small code corpus (ROOT/corpus.txt) and
    tokenize that corpus into ROOT/data/c; returns the dataset prefix."""
    (root / "corpus.txt").write_text(TEXT)
    train_bpe([TEXT], 300, root / "tok" / "tokenizer.json")
    return preprocess(["--input", str(root / "corpus.txt"), "--output-prefix", str(root / "data" / "c"),
                       "--tokenizer", str(root / "tok" / "tokenizer.json"), "--append-eod"])[0]
