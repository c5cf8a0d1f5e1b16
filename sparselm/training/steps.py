"""One optimizer step and one validation pass, for the two kinds of DeepSpeed engine.

``EngineSteps`` drives the plain engine (data, tensor and expert parallel): a loop over micro-batches.
``PipelineSteps`` drives DeepSpeed's pipeline engine (``train_batch`` / ``eval_batch``).  Both return
this rank's *local* averages; the trainer merges stages and averages data-parallel ranks.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from sparselm.model.hooks import AfterOptimizerStep, StartStep
from sparselm.model.transformer import layer_metrics


def after_optimizer_step(indexed_blocks) -> dict[str, torch.Tensor]:
    """Layers with state updated once per optimizer step (MoE selection bias, PKM slot usage) update it
    here; returns the step summaries they make (``step_metrics``), named ``layer{i}/{name}``.
    ``indexed_blocks``: (layer index, block) pairs."""
    out = {}
    for index, block in indexed_blocks:
        for module in block.modules():
            if isinstance(module, AfterOptimizerStep):
                module.after_optimizer_step()
        out.update(layer_metrics(index, block, "step_metrics"))
    return out


def start_step(blocks, step: int, first_sample: int, tokens: np.ndarray) -> None:
    """Tell layers keyed by token position (``StartStep``) the step and this rank's first token: sample
    ``first_sample`` of the global batch; ``tokens`` [samples, seq_len + 1] are this rank's rows."""
    offset = first_sample * (tokens.shape[1] - 1)
    for block in blocks:
        for module in block.modules():
            if isinstance(module, StartStep):
                module.start_step(step, offset)


class EngineSteps:
    def __init__(self, engine, model, device, micro: int):
        self.engine, self.model, self.device, self.micro = engine, model, device, micro
        self.blocks = model.all_blocks()  # (index, block): the layers and the multi-token-prediction blocks

    def _chunks(self, tokens: np.ndarray):
        for start in range(0, len(tokens), self.micro):
            yield torch.from_numpy(tokens[start:start + self.micro]).to(self.device)

    def train(self, tokens: np.ndarray, step: int = 0, first_sample: int = 0) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's rows ``tokens``; ``step``: steps done before it; ``first_sample``:
        the global-batch index of this rank's first row (noise keyed by token position)."""
        sums: dict[str, torch.Tensor] = {}
        n = 0
        self.engine.train()
        start_step([block for _, block in self.blocks], step, first_sample, tokens)
        for chunk in self._chunks(tokens):
            out = self.engine(chunk[:, :-1], chunk[:, 1:])
            self.engine.backward(out.loss)
            self.engine.step()
            values = {"loss": out.loss, "lm_loss": out.lm_loss, "aux_loss": out.aux_loss, **self.model.metrics()}
            if out.mtp_loss is not None:
                values["mtp_loss"] = out.mtp_loss
            for k, v in values.items():
                sums[k] = sums.get(k, 0) + v.detach().float().cpu()
            n += 1
        means = {k: v / n for k, v in sums.items()}
        return {**means, **{k: v.cpu() for k, v in after_optimizer_step(self.blocks).items()}}

    @torch.no_grad()
    def evaluate(self, tokens: np.ndarray) -> torch.Tensor:
        """Mean token loss over ``tokens`` (this rank's share)."""
        self.engine.eval()
        total = torch.zeros(())
        for chunk in self._chunks(tokens):
            total += self.engine(chunk[:, :-1], chunk[:, 1:]).lm_loss.float().cpu() * len(chunk)
        return total / len(tokens)


class PipelineSteps:
    """Micro-batches go in as ((input_ids, labels), labels): the first stage embeds the inputs, labels
    travel with the activations, the last stage computes the loss."""

    def __init__(self, engine, pipe, device, micro: int, pp_group):
        self.engine, self.pipe, self.device, self.micro, self.pp_group = engine, pipe, device, micro, pp_group
        self.stages = pipe.block_stages()
        self.head = pipe.head_stage()

    def _batches(self, tokens: np.ndarray):
        for start in range(0, len(tokens), self.micro):
            chunk = torch.from_numpy(tokens[start:start + self.micro]).to(self.device)
            x, y = chunk[:, :-1].contiguous(), chunk[:, 1:].contiguous()
            yield (x, y), y

    def _stage_values(self, local: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Union of every stage's values (each layer lives on one stage; the loss on the last)."""
        parts = [None] * dist.get_world_size(self.pp_group)
        dist.all_gather_object(parts, local, group=self.pp_group)
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def _pop_local(self) -> dict[str, torch.Tensor]:
        local = {}
        for stage in self.stages:
            local.update(stage.pop_metrics())
        if self.head is not None:
            local.update(self.head.pop_losses())
        return local

    def train(self, tokens: np.ndarray, step: int = 0, first_sample: int = 0) -> dict[str, torch.Tensor]:
        self._pop_local()  # drop anything left from a validation pass
        blocks = [(stage.layer_index, stage.block) for stage in self.stages]
        blocks += self.head.mtp_blocks() if self.head is not None else []  # multi-token prediction's
        start_step([block for _, block in blocks], step, first_sample, tokens)
        self.engine.train_batch(data_iter=iter(list(self._batches(tokens))))
        step = after_optimizer_step(blocks)
        return self._stage_values({**self._pop_local(), **{k: v.cpu() for k, v in step.items()}})

    @torch.no_grad()
    def evaluate(self, tokens: np.ndarray) -> torch.Tensor:
        self._pop_local()
        batches = list(self._batches(tokens))
        self.engine.eval_batch(data_iter=iter(batches), num_micro_batches=len(batches), bcast_loss=False)
        return self._stage_values(self._pop_local())["lm_loss"]
