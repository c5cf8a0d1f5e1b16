"""Multi-token prediction (DeepSeek-AI 2024, DeepSeek-V3 section 2.2), ``model.mtp_layers``: sequential
modules, each predicting one token further ahead than the one before it.

Depth k (1-based) at position i combines the previous depth's hidden state h^{k-1}_i (h^0: the main model's
last hidden state, before the final norm) with the embedding of token t_{i+k}:
h'_i = W_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)] (embedding first, as Megatron-LM's and vLLM's
DeepSeek MTP read the released ``eh_proj``), then one transformer block of the model's last kind, then its
own final RMSNorm and the shared output projection predict t_{i+k+1} (cross-entropy over the positions that
have one).  The embedding and the output projection are the main model's.  Token t_{i+k} is label i+k-1 (the
labels are the inputs shifted by one), so a depth needs only the labels: under pipeline parallelism the last
stage, which has the labels, runs every depth.  Names follow DeepSeek-V3's released MTP layer:
``enorm``, ``hnorm``, ``eh_proj``, the block, ``norm`` (its ``shared_head.norm``).
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.model.norm import RMSNorm


def shifted(labels: torch.Tensor, by: int) -> torch.Tensor:
    """labels [B, T] moved ``by`` positions to the left, the last ``by`` positions -100 (nothing to predict)."""
    if by == 0:
        return labels
    return torch.cat([labels[:, by:], labels.new_full((labels.shape[0], by), -100)], dim=1)


class MTPLayer(nn.Module):
    """One depth: ``forward(h [B, T, D], embedded [B, T, D]) -> (h_next [B, T, D], aux_loss)``."""

    def __init__(self, mcfg, block: nn.Module):
        super().__init__()
        d = mcfg.d_model
        self.enorm = RMSNorm(d, eps=mcfg.norm_eps)
        self.hnorm = RMSNorm(d, eps=mcfg.norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.norm = RMSNorm(d, eps=mcfg.norm_eps)

    def forward(self, h: torch.Tensor, embedded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.block(self.eh_proj(torch.cat([self.enorm(embedded), self.hnorm(h)], dim=-1)))


def mtp_losses(layers, h: torch.Tensor, labels: torch.Tensor, embed: nn.Module, head: nn.Module
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the token loss of every depth, the sum of their blocks' auxiliary losses) of MTP ``layers`` on the main
    model's last hidden state ``h`` [B, T, D] with ``labels`` [B, T]; ``embed``, ``head``: the main model's
    token embedding and output head (its ``loss(h, labels, norm=...)``)."""
    losses, aux = [], h.new_zeros((), dtype=torch.float32)
    for k, layer in enumerate(layers, start=1):
        tokens = shifted(labels, k - 1)
        h, block_aux = layer(h, embed(tokens.masked_fill(tokens == -100, 0)))
        aux = aux + block_aux
        losses.append(head.loss(h, shifted(labels, k), norm=layer.norm))
    return losses, aux
