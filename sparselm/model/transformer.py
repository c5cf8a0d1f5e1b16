"""Decoder-only language model assembled from the block kinds in ``model.pattern``."""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.model.hooks import ActiveParams
from sparselm.model.init import (
    InitSource,
    check_materialized,
    deferred_init,
    initial_values,
    materialize,
    owned_parameters,
)
from sparselm.model.loss import chunked_loss_sum
from sparselm.model.mtp import MTPLayer, mtp_losses
from sparselm.model.norm import RMSNorm
from sparselm.model.pkm.blocks import bind_shared_values
from sparselm.model.registry import BLOCKS


class LossOutput(NamedTuple):
    """A named tuple, so hooks that wrap module outputs (ZeRO-3's) see its tensors."""

    loss: torch.Tensor
    """lm_loss + aux_loss: what is back-propagated."""
    lm_loss: torch.Tensor
    """Mean next-token cross-entropy."""
    aux_loss: torch.Tensor
    """Sum of the (coefficient-weighted) auxiliary losses of all layers."""
    mtp_loss: torch.Tensor | None = None
    """model.mtp_loss_weight x the mean of the multi-token-prediction depths' token losses (included in loss);
    None without model.mtp_layers."""


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)) if the kind has one."""

    def __init__(self, mcfg, attention: nn.Module, ffn: nn.Module | None, kind: str):
        super().__init__()
        self.kind = kind
        self.input_norm = RMSNorm(mcfg.d_model, eps=mcfg.norm_eps)
        self.attn = attention
        self.post_attn_norm = RMSNorm(mcfg.d_model, eps=mcfg.norm_eps) if ffn is not None else None
        self.ffn = ffn

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x + self.attn(self.input_norm(x))
        aux = x.new_zeros(())
        if self.ffn is not None:
            out = self.ffn(self.post_attn_norm(x))
            if isinstance(out, tuple):
                out, aux = out
            x = x + out
        return x, aux


def layer_metrics(index: int, block: nn.Module, kind: str = "metrics") -> dict[str, torch.Tensor]:
    """The ``metrics`` dicts of a block's modules from their last forward (or, with kind="step_metrics",
    the summaries they made at the last optimizer step end), named ``layer{index}/{name}``."""
    out = {}
    for module in block.modules():
        for name, value in getattr(module, kind, {}).items():
            out[f"layer{index}/{name}"] = value.detach().float()
    return out


class LMHead(nn.Module):
    """Final norm, output projection and the token loss (swapped whole for vocab-parallel)."""

    def __init__(self, mcfg):
        super().__init__()
        self.norm = RMSNorm(mcfg.d_model, eps=mcfg.norm_eps)
        self.proj = nn.Linear(mcfg.d_model, mcfg.vocab_size, bias=False)
        self.chunk_tokens = mcfg.loss_chunk_tokens

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(h))

    def token_loss_sum(self, h: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """Summed fp32 cross-entropy of tokens h [N, D] with labels [N] (-100 ignored); ``norm`` replaces the final
        norm (a multi-token-prediction depth's own)."""
        logits = self.proj((norm or self.norm)(h)).float()
        return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")

    def loss_terms(self, h: torch.Tensor, labels: torch.Tensor,
                   norm: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed cross-entropy over labels != -100, their count), logits model.loss_chunk_tokens at a time
        (``sparselm.model.loss``); context parallelism adds both over the sequence's pieces."""
        total = chunked_loss_sum(lambda x, y: self.token_loss_sum(x, y, norm), h, labels, self.chunk_tokens)
        return total, (labels != -100).sum()

    def loss(self, h: torch.Tensor, labels: torch.Tensor, norm: nn.Module | None = None) -> torch.Tensor:
        """Mean next-token cross-entropy over labels != -100 (``norm``: as ``token_loss_sum``)."""
        total, count = self.loss_terms(h, labels, norm)
        return total / count


class SparseLM(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        mcfg = cfg.model
        assert mcfg.vocab_size > 0, "model.vocab_size must be resolved from the tokenizer before building"
        self.config = cfg
        self.embed = nn.Embedding(mcfg.vocab_size, mcfg.d_model)
        blocks = []
        for i, kind in enumerate(mcfg.layer_kinds()):
            attention, ffn = BLOCKS[kind].build(cfg, i)
            blocks.append(Block(mcfg, attention, ffn, kind))
        self.layers = nn.ModuleList(blocks)

        bind_shared_values(self.layers)  # a layer of pkm.share_values reads its owner's table
        self.head = LMHead(mcfg)
        # multi-token prediction depths (DeepSeek-V3), each with a block of the last layer's kind
        self.mtp = nn.ModuleList(MTPLayer(mcfg, Block(mcfg, *BLOCKS[kind].build(cfg, mcfg.n_layers + k), kind))
                                 for k, kind in enumerate([mcfg.layer_kinds()[-1]] * mcfg.mtp_layers)) or None
        self.reset_parameters()
        # No weight decay on the embedding matrix, wherever a layout puts it (tied, sharded, staged).
        self.embed.weight.optim_group = "no_decay"
        if mcfg.tie_embeddings:
            self.head.proj.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Initialise every module from its own stream (``sparselm.model.init``): the same values whichever
        rank builds which piece.  ``seed``: train.seed unless given.  A no-op on the meta device."""
        if self.embed.weight.is_meta:
            return
        seed = self.config.train.seed if seed is None else seed
        for name, attrs in owned_parameters(self).items():
            module = self.get_submodule(name)
            values = initial_values(module, name, self.config.model, seed)
            for attr in attrs:
                module._parameters[attr].copy_(values[attr])

    def hidden(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.embed(input_ids)
        aux = h.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            h, a = block(h)
            aux = aux + a
        return h, aux

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
        """logits [B, T, vocab] without labels; a LossOutput with labels."""
        h, aux = self.hidden(input_ids)
        if labels is None:
            return self.head(h)
        lm_loss = self.head.loss(h, labels)
        if self.mtp is None:
            return LossOutput(loss=lm_loss + aux, lm_loss=lm_loss, aux_loss=aux)
        losses, mtp_aux = mtp_losses(self.mtp, h, labels, self.embed, self.head)
        self.mtp_metrics = {f"mtp{k}_loss": loss.detach() for k, loss in enumerate(losses, start=1)}
        mtp = self.config.model.mtp_loss_weight * torch.stack(losses).mean()
        aux = aux + mtp_aux
        return LossOutput(loss=lm_loss + aux + mtp, lm_loss=lm_loss, aux_loss=aux, mtp_loss=mtp)

    def all_blocks(self) -> list[tuple[int, nn.Module]]:
        """(layer index, block) of every block: the layers, then the multi-token-prediction depths' blocks
        (indices n_layers, n_layers + 1, ...)."""
        out = list(enumerate(self.layers))
        return out + [(len(self.layers) + k, layer.block) for k, layer in enumerate(self.mtp or [])]

    def metrics(self) -> dict[str, torch.Tensor]:
        """Detached per-layer metrics of the last forward, named ``layer{i}/{name}``, and each
        multi-token-prediction depth's token loss (``mtp{k}_loss``)."""
        out = {}
        for i, block in self.all_blocks():
            out.update(layer_metrics(i, block))
        if self.mtp is not None:
            out.update(getattr(self, "mtp_metrics", {}))
        return out

    def num_params(self, active: bool = False) -> int:
        """Parameter count; ``active`` counts what one token uses (modules may define active_params)."""
        total = 0
        seen = set()
        for module in self.modules():
            if active and isinstance(module, ActiveParams) and module is not self:
                total += module.active_params()
                seen.update(id(p) for p in module.parameters())
        for p in self.parameters():
            if id(p) not in seen:
                total += p.numel()
                seen.add(id(p))
        return total


def build_model(cfg, seed: int | None = None, device: str = "cpu") -> SparseLM:
    """The one-process model in fp32.  ``device="meta"``: parameters on the meta device (no memory, not
    initialised; buffers are real), what a parallel layout starts from before each rank materialises its
    pieces.  On CPU every module is initialised from ``seed`` (train.seed) and its name, so every layout
    starts from these exact values."""
    with deferred_init():
        model = SparseLM(cfg)
    if device == "meta":
        return model
    if device != "cpu":
        raise ValueError(f"build_model: device must be 'cpu' or 'meta', got {device!r}")

    materialize(model, InitSource(build_model(cfg, device="meta"), cfg, seed))
    check_materialized(model)
    return model
