"""Pipeline parallelism: the model's layers as a DeepSpeed ``PipelineModule``.

Activations between stages are ``(hidden, aux_loss, labels)``: the auxiliary losses of MoE layers
travel with the hidden states so the last stage adds them to the token loss, and the labels travel so
the (possibly vocab-parallel) head computes the loss itself.  Stages wrap the modules of an already
built (and tensor-parallel) ``SparseLM``, so weights are identical to the one-process model.
"""
from __future__ import annotations

import torch
from deepspeed.pipe import PipelineModule
from torch import nn


class EmbeddingStage(nn.Module):
    def __init__(self, embed: nn.Module):
        super().__init__()
        self.embed = embed

    def forward(self, inputs):
        input_ids, labels = inputs
        h = self.embed(input_ids)
        return h, h.new_zeros(1, dtype=torch.float32), labels


class BlockStage(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, inputs):
        h, aux, labels = inputs
        h, layer_aux = self.block(h)
        return h, aux + layer_aux.reshape(1), labels


class HeadStage(nn.Module):
    """Final norm, projection and token loss; keeps the detached loss parts of each micro-batch."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.head = head
        self.parts: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, inputs):
        h, aux, labels = inputs
        lm_loss = self.head.loss(h, labels)
        self.parts.append((lm_loss.detach(), aux.detach().reshape(())))
        return (lm_loss + aux.reshape(())).reshape(1)


def total_loss(output: torch.Tensor, _labels) -> torch.Tensor:
    return output.sum()


class SparseLMPipe(PipelineModule):
    """A PipelineModule that also exposes the per-layer metrics of its local blocks."""

    def local_blocks(self) -> list[tuple[int, nn.Module]]:
        """(global layer index, block) for the blocks on this stage."""
        return [(m.layer_index, m.block) for m in self.forward_funcs if isinstance(m, BlockStage)]

    def head_stage(self) -> HeadStage | None:
        return next((m for m in self.forward_funcs if isinstance(m, HeadStage)), None)


def build_pipeline(model, topology, partition_method: str = "parameters", activation_checkpoint_interval: int = 0):
    """Wrap a built ``SparseLM`` as a ``SparseLMPipe`` over DeepSpeed ``topology``."""
    if model.config.model.tie_embeddings:
        raise ValueError("model.tie_embeddings with parallel.pp > 1 is not supported yet: the embedding and the "
                         "output projection live on different stages; set model.tie_embeddings=false")
    stages: list[nn.Module] = [EmbeddingStage(model.embed)]
    for i, block in enumerate(model.layers):
        stage = BlockStage(block)
        stage.layer_index = i
        stages.append(stage)
    stages.append(HeadStage(model.head))
    return SparseLMPipe(layers=stages, topology=topology, loss_fn=total_loss, partition_method=partition_method,
                        activation_checkpoint_interval=activation_checkpoint_interval)
