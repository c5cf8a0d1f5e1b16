"""Token cross-entropy computed a chunk of tokens at a time, so the fp32 logits of the whole batch
(tokens x vocabulary x 4 bytes: 3.3 GB at 16k tokens and a 50k vocabulary, as much again for their
gradient) are never held at once.

``chunked_loss_sum(loss_sum, h, labels, chunk_tokens)`` flattens h [..., D] and labels [...] to tokens and
adds ``loss_sum(h_chunk, labels_chunk)`` (the summed loss of a chunk's valid labels) over chunks of
``chunk_tokens`` tokens.  Each chunk runs under torch's non-reentrant ``torch.utils.checkpoint``: forward
keeps only the chunk's hidden states and labels, backward recomputes that chunk's logits, so the peak holds one
chunk's logits and their gradient (as DeepSpeed's ``TiledFusedLogitsLoss`` and Liger's fused linear
cross-entropy tile the sequence).  Collectives inside ``loss_sum`` (megatron's vocab-parallel loss) run again
in the recomputation, in the same order on every rank.  A single chunk runs directly (no checkpoint), so a
batch of at most ``chunk_tokens`` tokens computes exactly what the unchunked loss computes.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils.checkpoint import checkpoint


def chunked_loss_sum(loss_sum: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], h: torch.Tensor,
                     labels: torch.Tensor, chunk_tokens: int) -> torch.Tensor:
    """Sum over tokens of ``loss_sum`` (fp32 scalar), ``chunk_tokens`` tokens at a time (0: all at once).

    h: [..., D] hidden states; labels: [...] int64, -100 ignored (``loss_sum`` sees them and must skip them)."""
    h, labels = h.reshape(-1, h.shape[-1]), labels.reshape(-1)
    n = labels.shape[0]
    if chunk_tokens <= 0 or n <= chunk_tokens:
        return loss_sum(h, labels)
    total = h.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk_tokens):
        end = min(start + chunk_tokens, n)
        total = total + checkpoint(loss_sum, h[start:end], labels[start:end], use_reentrant=False)
    return total
