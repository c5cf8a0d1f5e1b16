"""Non-finite steps: never applied, logged as skipped, and a run that keeps producing them stops.

DeepSpeed skips an optimizer step whose gradients overflow under ZeRO stages 1-3 and fp16 (and says so in
``engine.was_step_applied()``); without ZeRO its fp32 and bf16 paths step regardless, so
``NonFiniteGuard.protect`` guards the client optimizer there.  The trainer then names the quantity that was not
finite from the step's record, whose values are already averaged over the data-parallel ranks (a NaN on one
rank is a NaN on all), so every rank takes the same decision without another collective.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

CHECKED = ("loss", "lm_loss", "aux_loss")
"""Record entries checked first, in this order; then every other ``*_loss`` entry, then ``grad_norm``."""


class NonFiniteGuard:
    """Non-finite steps for one ``Trainer``, beside ``StopGuard``: ``protect`` makes the client optimizer skip
    them where DeepSpeed would not, ``observe`` after every step marks the record ``skipped`` and counts the
    streak; ``diverged`` is the (name, value) that stops the run once ``max_skipped_steps`` steps in a row
    were not finite (0: never stop).  Under fp16 a skipped step with finite losses is a loss-scale overflow,
    which DeepSpeed handles by lowering the scale: it neither counts nor stops the run."""

    def __init__(self, max_skipped_steps: int, fp16: bool):
        self.limit = max_skipped_steps
        self.fp16 = fp16
        self.streak = 0
        """Consecutive non-finite steps, none of them applied (no checkpoint is written while it is > 0)."""
        self.optimizer_skipped = False
        """Whether ``protect``'s optimizer skipped its last step."""
        self.diverged: tuple[str, float] | None = None

    def protect(self, optimizer: torch.optim.Optimizer) -> None:
        """Make ``optimizer.step`` a no-op (every rank alike, through one all-reduce of a flag) when any rank's
        gradients hold a non-finite value.  Collective: only where every rank steps together (ZeRO stage 0,
        the pipeline engine); ZeRO stages 1-3 and fp16 skip an overflowing step themselves."""
        inner = optimizer.step

        def step(*args, **kwargs):
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            bad = torch.zeros(1)
            if grads:
                bad = torch.stack([torch.isfinite(g).all().logical_not() for g in grads]).any().float().reshape(1).cpu()
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            self.optimizer_skipped = bool(bad.item())
            return None if self.optimizer_skipped else inner(*args, **kwargs)

        optimizer.step = step

    def observe(self, record: dict, step_applied: bool) -> None:
        """Mark ``record`` (one step's, averaged over the data-parallel ranks) ``skipped`` when its step was not
        applied or a loss or the gradient norm is not finite, and update the streak and ``diverged``."""
        if not step_applied or self.optimizer_skipped:
            record["skipped"] = 1
            record.setdefault("grad_norm", float("nan"))  # not computed (no clipping), but not finite
        bad = first_nonfinite(record)
        if bad is None and "skipped" not in record:
            self.streak = 0
            return
        record["skipped"] = 1
        if bad is None and self.fp16:
            return  # a loss-scale overflow: DeepSpeed lowers the scale and goes on
        self.streak += 1
        if self.limit and self.streak >= self.limit:
            self.diverged = bad or ("grad_norm", record.get("grad_norm", float("nan")))


def first_nonfinite(record: dict) -> tuple[str, float] | None:
    """(name, value) of the first non-finite loss, aux loss or gradient norm in a step's record, or None."""
    names = [*CHECKED, *sorted(k for k in record if k.endswith("_loss") and k not in CHECKED), "grad_norm"]
    for name in names:
        value = record.get(name)
        if isinstance(value, float) and not math.isfinite(value):
            return name, value
    return None
