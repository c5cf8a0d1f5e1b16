"""sparselm: a trainer for wide, sparsely activated language models."""
__version__ = "0.1.0"


def load_model(path: str):
    """Load ``(model, config)`` on CPU in fp32 from a checkpoint directory or a run directory (its latest)."""
    from sparselm.checkpoint import load_model as _load

    return _load(path)


__all__ = ["load_model", "__version__"]
