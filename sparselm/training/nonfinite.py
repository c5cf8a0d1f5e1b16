"""Non-finite steps: never applied, logged as skipped, and a run that keeps producing them stops.

DeepSpeed skips an optimizer step whose gradients overflow under ZeRO stages 1-3 and fp16 (and says so in
``engine.was_step_applied()``); without ZeRO its fp32 and bf16 paths step regardless, so
``skip_nonfinite_steps`` guards the client optimizer there.  The trainer then names the quantity that was not
finite from the step's record, whose values are already averaged over the data-parallel ranks (a NaN on one
rank is a NaN on all), so every rank takes the same decision without another collective.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

CHECKED = ("loss", "lm_loss", "aux_loss")
"""Record entries checked first, in this order; then every other ``*_loss`` entry, then ``grad_norm``."""


def skip_nonfinite_steps(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer.step`` a no-op (every rank alike, through one all-reduce of a flag) when any rank's
    gradients hold a non-finite value; ``optimizer.sparselm_skipped`` tells whether the last step was skipped.
    Collective: call only where every rank steps together (ZeRO stage 0, the pipeline engine)."""
    inner = optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bad = torch.zeros(1)
        if grads:
            bad = torch.stack([torch.isfinite(g).all().logical_not() for g in grads]).any().float().reshape(1).cpu()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        optimizer.sparselm_skipped = bool(bad.item())
        return None if optimizer.sparselm_skipped else inner(*args, **kwargs)

    optimizer.sparselm_skipped = False
    optimizer.step = step


def first_nonfinite(record: dict) -> tuple[str, float] | None:
    """(name, value) of the first non-finite loss, aux loss or gradient norm in a step's record, or None."""
    names = [*CHECKED, *sorted(k for k in record if k.endswith("_loss") and k not in CHECKED), "grad_norm"]
    for name in names:
        value = record.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            return name, value
    return None
