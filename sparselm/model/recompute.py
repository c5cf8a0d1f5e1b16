"""Whether the forward running now is a recomputation (activation checkpointing's second forward).

``sparselm.parallel.recompute`` runs a block's forward again during backward to rebuild the activations it
did not keep.  That forward must compute the same numbers as the first and must not count anything twice:
layers check ``recomputing()`` before they add to statistics (MoE load counters and metrics, PKM slot
usage), and a layer whose forward advances state (the noisy router's token positions) implements
``hooks.ForwardState`` so the recomputation replays the state the first forward saw.  A plain counter, not
thread-local: CUDA runs backward (hence recomputation) on autograd's own threads.
"""
from __future__ import annotations

from contextlib import contextmanager

_depth = 0


def recomputing() -> bool:
    """True inside a recomputed forward: do not record statistics, draw the same randomness as before."""
    return _depth > 0


@contextmanager
def recomputation():
    """Mark the forward run inside as a recomputation (``recomputing()`` is True)."""
    global _depth
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1


def recomputed_layers(n_layers: int, every: int) -> list[int]:
    """Indices of the blocks ``parallel.recompute_every=every`` recomputes: every-1, 2*every-1, ..."""
    return [i for i in range(n_layers) if (i + 1) % every == 0]
