"""The hooks a layer module may implement; the model, the trainer and the parallel code call them.

None is required: each is looked for by name on every submodule (``isinstance`` against these
runtime-checkable protocols), so a new layer kind opts in by defining the attribute or method.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class HasMetrics(Protocol):
    metrics: dict[str, torch.Tensor]
    """Detached scalars/vectors describing the last forward, logged per layer as ``layer{i}/{name}``.  The
    trainer averages them over micro-batches and data-parallel ranks, so each must be a mean over the
    forward's tokens (a maximum or a ratio of sums belongs in ``step_metrics``)."""


@runtime_checkable
class HasStepMetrics(Protocol):
    step_metrics: dict[str, torch.Tensor]
    """Summaries made by ``after_optimizer_step`` over the whole step (e.g. from counts summed over ranks)."""


@runtime_checkable
class AfterOptimizerStep(Protocol):
    def after_optimizer_step(self) -> None:
        """Called once on every rank after each optimizer step: update state kept outside the optimizer
        (MoE selection bias, PKM slot usage) and fill ``step_metrics``; may use collectives over the
        data-parallel group, so every rank must call it."""


@runtime_checkable
class ActiveParams(Protocol):
    def active_params(self) -> int:
        """Parameters one token uses in this module (sparse layers use fewer than they hold)."""


@runtime_checkable
class ResetParameters(Protocol):
    def reset_parameters(self) -> None:
        """(Re)initialise this module's own parameters from the stds it was built with."""


@runtime_checkable
class StartStep(Protocol):
    def start_step(self, step: int, token_offset: int) -> None:
        """Called on every rank before each optimizer step's first micro-batch: ``step`` optimizer steps are
        done, and this rank's first token is at position ``token_offset`` of the step's global batch
        (sample * seq_len + t).  Lets a layer key its randomness by token, not by layout (noisy gating)."""


@runtime_checkable
class ForwardState(Protocol):
    def forward_state(self):
        """What a training forward advances (e.g. the noisy router's next token position): taken before a
        recomputed block's first forward, so that its recomputation replays it (``sparselm.model.recompute``)."""

    def set_forward_state(self, state) -> None:
        """Put back a state ``forward_state`` returned."""
