"""DeepSpeed optimizer-state surgery: canonical fp32 weights and Adam moments out of an engine and into one.

Works at every ZeRO stage (0-3, with offload) and every layout: ZeRO-managed parameters go through
DeepSpeed's fragment API (``safe_get/set_full_fp32_param``, ``safe_get/set_full_optimizer_state``), the
others through the base optimizer's state; pieces are gathered to / cut from canonical tensors by
``sparselm.parallel.canonical``.  The on-disk format is ``sparselm.checkpoint``'s.
"""
from __future__ import annotations

import torch

from sparselm.parallel.deepspeed_private import relink_zero_optimizer_state, zero_flat_fp32_partitions

MOMENTS = ("exp_avg", "exp_avg_sq")
"""Adam's state tensors, stored as ``{canonical name}::{moment}``."""


def _zero_managed(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _adam_state(engine, p):
    """The base optimizer's state dict of a parameter that ZeRO does not manage."""
    return base_optimizer(engine).state[p]


def _stateful_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer keys its state by.  ZeRO-3 keys it by flat fp32 partitions that
    sit outside ``param_groups`` between steps."""
    opt = base_optimizer(engine)
    tensors = [p for group in opt.param_groups for p in group["params"]]
    return tensors + zero_flat_fp32_partitions(engine.optimizer)


def link_optimizer_state(engine) -> None:
    """Make every parameter's Adam moments exist and be reachable through DeepSpeed's fragment API.

    Adam creates its state lazily at the first step; before it, moments are created as zeros (the
    values a first step starts from) so a checkpoint can be loaded into them.  DeepSpeed's ZeRO 1/2
    links fragments after the first parameter group's step only, leaving later groups unlinked; the
    link is redone here for all groups."""
    opt = base_optimizer(engine)
    integer_steps = "DeepSpeedCPUAdam" in type(opt).__name__
    for p in _stateful_tensors(engine):
        st = opt.state[p]
        if "exp_avg" not in st:
            st["step"] = 0 if integer_steps else torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
    relink_zero_optimizer_state(engine.optimizer)


def _local_tensors(model) -> dict[str, torch.Tensor]:
    """Local name -> tensor for parameters and persistent buffers (one entry per tied parameter)."""
    out = dict(model.named_parameters())
    for name, tensor in model.state_dict(keep_vars=True).items():
        out.setdefault(name, tensor)
    return out


def _full_fp32(p) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p) if isinstance(p, torch.nn.Parameter) and _zero_managed(p) else p


def collect_state(engine, model, groups: dict, pp_group=None) -> tuple[dict | None, dict | None]:
    """Collective: (canonical model tensors, canonical Adam moments) on global rank 0, (None, None) elsewhere."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from sparselm.parallel.canonical import gather_full
    from sparselm.parallel.pieces import placements

    link_optimizer_state(engine)
    names = canonical_names_of(model)
    params = dict(model.named_parameters())
    weights, moments, specs = {}, {}, {}
    for local, tensor in _local_tensors(model).items():
        canon = names[local]
        specs[canon] = placements(tensor)
        weights[canon] = _full_fp32(tensor).detach().float().cpu()
        p = params.get(local)
        if p is None:
            continue
        for key in MOMENTS:
            value = safe_get_full_optimizer_state(p, key) if _zero_managed(p) else _adam_state(engine, p).get(key)
            if value is not None:
                moments[f"{canon}::{key}"] = value.detach().float().cpu()
                specs[f"{canon}::{key}"] = specs[canon]
    return gather_full(weights, specs, groups, pp_group), gather_full(moments, specs, groups, pp_group)


def canonical_names_of(model) -> dict[str, str]:
    from sparselm.parallel.canonical import canonical_names

    return canonical_names(model)


def load_full_state(engine, model, tensors: dict, moments: dict | None, optimizer_step: int,
                    groups: dict | None = None) -> None:
    """Write canonical fp32 master weights and Adam moments into an initialised engine (any ZeRO stage,
    any layout: each rank takes its own piece).  The module's working weights must already hold the
    checkpoint (load it into the full model before parallelising and building the engine)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from sparselm.parallel.pieces import piece, placements

    aliases = getattr(model, "canonical_aliases", {})
    names = {local: aliases.get(canon, canon) for local, canon in canonical_names_of(model).items()}
    params = dict(model.named_parameters())
    for local, p in params.items():
        if _zero_managed(p):  # the fp32 master copy ZeRO steps from
            safe_set_full_fp32_param(p, piece(tensors[names[local]], placements(p), groups).contiguous().to(p.device))
    if not moments:
        return
    link_optimizer_state(engine)
    for local, p in params.items():
        for key in MOMENTS:
            value = moments.get(f"{names[local]}::{key}")
            if value is None:
                continue
            value = piece(value, placements(p), groups)
            if _zero_managed(p):
                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                _adam_state(engine, p)[key].copy_(value)
    _set_optimizer_step(engine, optimizer_step)


def _set_optimizer_step(engine, step: int) -> None:
    opt = base_optimizer(engine)
    for group in opt.param_groups:
        if "step" in group:  # DeepSpeedCPUAdam also counts steps per group
            group["step"] = step
    for p in _stateful_tensors(engine):
        st = opt.state.get(p)
        if st is not None and "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def optimizer_step_count(engine) -> int:
    opt = base_optimizer(engine)
    for p in _stateful_tensors(engine):
        st = opt.state.get(p)
        if st and "step" in st:
            return int(st["step"])
    return 0
