"""Live slot-usage statistics of a memory layer, measured in optimizer steps.

State is kept in buffers so that it moves with the module (device, checkpoints) and resumes exactly:
- ``step``: optimizer steps seen (advanced by ``after_optimizer_step``, which the trainer calls);
- ``last_read[n]``: the step at which each slot was last read (``NEVER`` if not yet);
- ``mass[n]``: exponentially decayed sum over completed steps of the softmax weight each slot received;
- ``pending[n]``: weight received in the current step (not persistent: it is zero at every step end,
  where checkpoints are written).
Counting in optimizer steps rather than forwards keeps the figures independent of micro-batching.
At each step end the step's reads are merged over the data-parallel ranks (``stats_reducer``, set by
``sparselm.parallel``: ``pending`` summed, ``last_read`` maxed), so the statistics describe the global
batch and are the same under every layout; ``step_metrics`` then holds the step's summary.
"""
from __future__ import annotations

import math

import torch
from torch import nn

NEVER = -(2 ** 62)  # exactly representable in fp32, so it survives the fp32 checkpoint format


class SlotUsage(nn.Module):
    def __init__(self, n_slots: int, window: int, dead_after: int):
        super().__init__()
        self.n_slots, self.window, self.dead_after = n_slots, window, dead_after
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_read", torch.full((n_slots,), NEVER, dtype=torch.long))
        self.register_buffer("mass", torch.zeros(n_slots))
        self.register_buffer("pending", torch.zeros(n_slots), persistent=False)
        self.stats_reducer = None
        self.step_metrics: dict[str, torch.Tensor] = {}

    def _apply(self, fn, recurse=True):
        # Keep the averages in fp32 when the model is cast to bf16/fp16: small weights added to a
        # large low-precision sum would vanish.
        super()._apply(fn, recurse)
        for name in ("mass", "pending"):
            buf = getattr(self, name)
            if buf.dtype != torch.float32:
                setattr(self, name, buf.float())
        return self

    @torch.no_grad()
    def record(self, slots: torch.Tensor, weights: torch.Tensor) -> None:
        """Note one forward's reads: slot indices and their softmax weights (any matching shapes)."""
        flat = slots.reshape(-1)
        self.last_read.index_fill_(0, flat, self.step)
        self.pending.index_add_(0, flat, weights.reshape(-1).to(self.pending.dtype))

    @property
    def decay(self) -> float:
        return 1.0 - 1.0 / self.window

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Merge the step's reads over ranks, summarise the step into ``step_metrics``, then advance."""
        if self.stats_reducer is not None:
            self.pending.copy_(self.stats_reducer(self.pending, "sum"))
            self.last_read.copy_(self.stats_reducer(self.last_read, "max"))
        self.step_metrics = self.summary()
        self.mass.mul_(self.decay).add_(self.pending)
        self.pending.zero_()
        self.step += 1

    @torch.no_grad()
    def summary(self) -> dict[str, torch.Tensor]:
        """pkm_read_frac: fraction of slots read in the last ``window`` steps (this one included);
        pkm_usage_kl: KL(usage || uniform) of the averaged read weight; pkm_dead_slots: slots unread for
        ``dead_after`` steps."""
        recent = (self.last_read > self.step - self.window).sum()
        dead = (self.last_read <= self.step - self.dead_after).sum()
        mass = torch.add(self.pending, self.mass, alpha=self.decay)  # step s weighs decay**(now - s)
        total = mass.sum()
        # KL(p || uniform) = log n + sum p log p, with p = mass / total:
        # sum p log p = sum(mass log mass) / total - log total.
        kl = math.log(self.n_slots) + torch.special.xlogy(mass, mass).sum() / total - total.log()
        kl = torch.where(total > 0, kl, torch.zeros_like(kl))
        return {"pkm_read_frac": recent / self.n_slots, "pkm_usage_kl": kl.clamp_min(0.0),
                "pkm_dead_slots": dead.float()}
