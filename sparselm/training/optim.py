"""Parameter groups and the learning-rate schedule.

Groups: matrices get weight decay; norms and biases do not.  A parameter can ask for another group
by a tag that survives any parallel layout: ``param.optim_group = "name"`` (the model tags its
embedding ``no_decay``) and ``param.optim_overrides = {"lr_scale": float, "weight_decay": float}``
(PKM value tables and persistent attention memory do this).
"""
from __future__ import annotations

import math

from torch import nn


def param_groups(model: nn.Module, ocfg) -> list[dict]:
    groups: dict[str, dict] = {}
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partitioned parameter's data is flat
        tag = getattr(p, "optim_group", None)
        if tag is None:
            tag = "no_decay" if ndim < 2 else "decay"
        if tag not in groups:
            overrides = getattr(p, "optim_overrides", {})
            groups[tag] = {
                "name": tag,
                "params": [],
                "lr_scale": overrides.get("lr_scale", 1.0),
                # a tagged group of matrices decays like the rest unless its tag says otherwise
                "weight_decay": overrides.get("weight_decay", ocfg.weight_decay if tag != "no_decay" and ndim >= 2 else 0.0),
            }
        groups[tag]["params"].append(p)
    return [g for g in groups.values() if g["params"]]


def lr_at(step: int, ocfg, total_steps: int) -> float:
    """Linear warmup to lr, then cosine decay to lr * min_lr_ratio at total_steps. ``step`` counts from 0."""
    if ocfg.warmup_steps and step < ocfg.warmup_steps:
        return ocfg.lr * (step + 1) / ocfg.warmup_steps
    span = max(1, total_steps - ocfg.warmup_steps)
    progress = min(1.0, (step - ocfg.warmup_steps) / span)
    floor = ocfg.lr * ocfg.min_lr_ratio
    return floor + 0.5 * (ocfg.lr - floor) * (1 + math.cos(math.pi * progress))


def set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
