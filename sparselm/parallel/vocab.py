"""Vocabulary-parallel embedding, output projection and cross-entropy (rank r holds vocabulary rows
[r*V/tp, (r+1)*V/tp) of both, so a tied embedding stays one shared shard)."""
from __future__ import annotations

import torch
from megatron.core.tensor_parallel import VocabParallelEmbedding, vocab_parallel_cross_entropy
from torch import nn

from sparselm.model.init import deferred_init
from sparselm.model.loss import chunked_loss_sum
from sparselm.model.transformer import LMHead
from sparselm.parallel.comm import gather_along_dim
from sparselm.parallel.pieces import Shard
from sparselm.parallel.tensor import adopt, column_parallel, megatron_config, register_tp_rule


def vocab_parallel_embedding(embed: nn.Embedding, topo) -> VocabParallelEmbedding:
    """Rows [r*V/tp, (r+1)*V/tp) on TP rank r: the piece ``Shard(0, "tp")`` of the embedding (its Parameter,
    so the model's tags, e.g. no weight decay, and a tied output projection stay)."""
    with deferred_init():
        layer = VocabParallelEmbedding(embed.num_embeddings, embed.embedding_dim, init_method=lambda w: None,
                                       config=megatron_config(topo, embed.weight.dtype), tp_group=topo.tp_group)
    adopt(layer, "weight", embed.weight, Shard(0, "tp"), topo)
    return layer


class VocabParallelLMHead(nn.Module):
    """``LMHead`` with the projection split by vocabulary; same interface, same numbers."""

    def __init__(self, head: LMHead, topo):
        super().__init__()
        self.norm = head.norm
        self.proj = column_parallel(head.proj, topo)
        self.chunk_tokens = head.chunk_tokens

    def local_logits(self, h: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """This rank's vocabulary slice of the logits (``norm``: instead of the final norm)."""
        return self.proj((norm or self.norm)(h))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Full logits [..., vocab] on every rank (generation, evaluation)."""
        return gather_along_dim(self.local_logits(h), -1, self.proj.tp_group)

    def token_loss_sum(self, h: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """Summed fp32 cross-entropy of tokens h [N, D] with labels [N] (-100 ignored), from this rank's
        vocabulary slice of the logits (megatron's vocab-parallel loss; full logits are never formed); ``norm``:
        instead of the final norm, as ``LMHead.loss``."""
        valid = labels != -100
        # megatron's loss has no ignore_index: feed a harmless id and zero those positions.
        per_token = vocab_parallel_cross_entropy(self.local_logits(h, norm).float(), labels.masked_fill(~valid, 0))
        return (per_token * valid).sum()

    def loss_terms(self, h: torch.Tensor, labels: torch.Tensor,
                   norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """As ``LMHead.loss_terms``: (summed loss, valid label count), model.loss_chunk_tokens at a time."""
        total = chunked_loss_sum(lambda x, y: self.token_loss_sum(x, y, norm), h, labels, self.chunk_tokens)
        return total, (labels != -100).sum()

    def loss(self, h: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """Mean cross-entropy over labels != -100, without materialising full logits."""
        total, count = self.loss_terms(h, labels, norm)
        return total / count


@register_tp_rule(LMHead)
def tp_lm_head(head: LMHead, topo) -> VocabParallelLMHead:
    return VocabParallelLMHead(head, topo)
