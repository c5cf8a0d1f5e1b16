"""sparselm: a trainer for wide, sparsely activated language models."""
__version__ = "0.1.0"


def load_model(path: str):
    """Load ``(model, config)`` on CPU in fp32 from a checkpoint directory or a run directory (its latest)."""
    from sparselm.checkpoint import load_model as _load

    return _load(path)


def load_tokenizer(path: str):
    """The tokenizer of a checkpoint or run directory (``encode(text) -> ids``, ``decode(ids)``, ``eod_id``)."""
    from sparselm.checkpoint import load_tokenizer as _load

    return _load(path)


__all__ = ["load_model", "load_tokenizer", "__version__"]
