"""sparselm: a trainer for wide, sparsely activated language models."""
import os

# CPU tensors of 2 MB and more in transparent huge pages (PyTorch's allocator setting): a fresh 64 MB
# gradient, such as a PKM value table's each step, then costs 3 ms of page faults instead of 19.  torch
# reads it at its first CPU allocation, so it holds where sparselm is imported before torch allocates
# (every sparselm command and tool); THP_MEM_ALLOC_ENABLE=0 in the environment turns it off.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

__version__ = "0.1.0"


def load_model(path: str):
    """Load ``(model, config)`` on CPU in fp32 from a checkpoint directory or a run directory (its latest)."""
    from sparselm.checkpoint.checkpointing import load_model as _load

    return _load(path)


def load_tokenizer(path: str):
    """The tokenizer of a checkpoint or run directory (``encode(text) -> ids``, ``decode(ids)``, ``eod_id``)."""
    from sparselm.checkpoint.checkpointing import load_tokenizer as _load

    return _load(path)


__all__ = ["load_model", "load_tokenizer", "__version__"]
