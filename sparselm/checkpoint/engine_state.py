"""DeepSpeed optimizer-state surgery: canonical fp32 weights and Adam moments out of an engine and into one.

Works at every ZeRO stage (0-3, with offload) and every layout: ZeRO-managed parameters go through
DeepSpeed's fragment API (``safe_get/set_full_fp32_param``, ``safe_get/set_full_optimizer_state``), the
others through the base optimizer's state; pieces are gathered to / cut from canonical tensors by
``sparselm.parallel.canonical``.  The on-disk format is ``sparselm.checkpoint.checkpointing``'s.
"""
from __future__ import annotations

import torch

from sparselm.parallel.boxes import flat_range_boxes, piece_layout, piece_views
from sparselm.parallel.canonical import canonical_names
from sparselm.parallel.deepspeed_private import (
    relink_zero_optimizer_state,
    zero3_partition,
    zero_flat_fp32_partitions,
    zero_fragment,
)
from sparselm.parallel.pieces import piece, placements

MOMENTS = ("exp_avg", "exp_avg_sq")
"""Adam's state tensors, stored as ``{canonical name}::{moment}``."""


def zero_managed(p: torch.nn.Parameter) -> bool:
    """Whether DeepSpeed's ZeRO owns ``p``'s fp32 master copy and optimizer state (stage 3's ``ds_id``, stages
    1-2's ``_hp_mapping``); such state is read and written through deepspeed.utils' safe accessors."""
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16/fp16 optimizers) of ``engine``."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def adam_state(engine, p):
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


def local_tensors(model) -> dict[str, torch.Tensor]:
    """Local name -> tensor for parameters (the first name of a tied one) and persistent buffers."""
    out = dict(model.named_parameters())
    seen = {id(p) for p in out.values()}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            out.setdefault(name, tensor)
    return out


def _fragments(engine, p) -> list[tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]]:
    """What this rank owns of ``p``'s fp32 master weights and Adam moments: [(first element of the flattened
    piece, element count, flat fp32 master view, {moment: flat view})], views into the optimizer's own storage.
    ZeRO 1/2 (and DeepSpeed's bf16 optimizer): the fragment of its flat partition; ZeRO-3: its partition;
    otherwise the whole piece (the parameter is its own master)."""
    if hasattr(p, "_hp_mapping"):
        if p._hp_mapping is None:  # this rank's partition holds none of it
            return []
        start, numel, master, moments = zero_fragment(p, MOMENTS)
        return [(start, numel, master, moments)]
    if hasattr(p, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

        start, numel = zero3_partition(p)
        if numel <= 0:
            return []
        moments = {k: safe_get_local_optimizer_state(p, k).narrow(0, 0, numel) for k in MOMENTS}
        return [(start, numel, safe_get_local_fp32_param(p).narrow(0, 0, numel), moments)]
    state = adam_state(engine, p)
    return [(0, p.numel(), p.detach().view(-1), {k: state[k].view(-1) for k in MOMENTS if k in state})]


def _pieces(model, groups: dict, skip_aliases: bool = True):
    """(local name, canonical name, tensor, canonical shape, segments) of every parameter and persistent buffer
    this rank holds.  The second copy of a tensor tied across pipeline stages is skipped (``skip_aliases``) or
    named by the tensor it copies."""
    aliases = getattr(model, "canonical_aliases", {})
    names = canonical_names_of(model)
    for local, tensor in local_tensors(model).items():
        canon = names[local]
        if canon in aliases:
            if skip_aliases:
                continue
            canon = aliases[canon]
        shape = tuple(getattr(tensor, "ds_shape", tensor.shape))
        yield (local, canon, tensor, *piece_layout(shape, placements(tensor), groups))


def state_boxes(engine, model, groups: dict):
    """(model boxes, optimizer boxes) of this rank for ``sparselm.checkpoint.shards.save_boxes``: the fp32 master
    weights and Adam moments (``NAME::exp_avg``, ``NAME::exp_avg_sq``) it owns, as boxes of the canonical
    tensors, and its persistent buffers.  No communication and no copy: views into the engine's storage."""
    link_optimizer_state(engine)
    params = dict(model.named_parameters())
    weights, moments = {}, {}
    for local, canon, tensor, shape, segs in _pieces(model, groups):
        p = params.get(local)
        if p is None:  # a persistent buffer, replicated: DCP keeps one copy
            weights[canon] = (shape, [(box.offsets, view) for box, view in piece_views(tensor.detach(), segs)])
            continue
        local_shape = tuple(getattr(p, "ds_shape", p.shape))
        weights.setdefault(canon, (shape, []))  # several local tensors may hold pieces of one (gather chunks)
        for start, numel, master, frag_moments in _fragments(engine, p):
            weights[canon][1].extend((b.offsets, v) for b, v in flat_range_boxes(local_shape, segs, start, numel, master))
            for key, flat in frag_moments.items():
                moments.setdefault(f"{canon}::{key}", (shape, []))[1].extend(
                    (b.offsets, v) for b, v in flat_range_boxes(local_shape, segs, start, numel, flat))
    return weights, moments


def load_state(engine, model, weights, moments, optimizer_step: int, groups: dict, batch_elements: int = 1 << 24) -> None:
    """Read this rank's fp32 master weights and Adam moments from ``weights`` / ``moments``
    (``ShardReader``s of a checkpoint's ``model/`` and ``optimizer/``) straight into the engine's storage, the
    elements it owns only, in batches of about ``batch_elements``.  The module's working weights must already
    hold the checkpoint (``parallel.materialize.build_sharded`` from the same reader)."""
    link_optimizer_state(engine)
    params = dict(model.named_parameters())
    pending: list[tuple[object, dict]] = []
    count = 0

    def add(reader, name, boxes):
        nonlocal count
        if not boxes:
            return
        pending.append((reader, {name: boxes}))
        count += sum(v.numel() for _, v in boxes)
        if count >= batch_elements:
            flush()

    def flush():
        nonlocal count
        for reader in {id(r): r for r, _ in pending}.values():
            wanted = {}
            for r, item in pending:
                if r is reader:
                    for name, boxes in item.items():
                        wanted.setdefault(name, []).extend(boxes)
            reader.read_into(wanted)
        pending.clear()
        count = 0

    for local, canon, _, _, segs in _pieces(model, groups, skip_aliases=False):
        p = params.get(local)
        if p is None:
            continue
        local_shape = tuple(getattr(p, "ds_shape", p.shape))
        managed = zero_managed(p)
        for start, numel, master, frag_moments in _fragments(engine, p):
            if managed:  # else the parameter is its own master, already read
                add(weights, canon, [(b.offsets, v) for b, v in flat_range_boxes(local_shape, segs, start, numel, master)])
            for key, flat in frag_moments.items():
                if f"{canon}::{key}" in moments:
                    add(moments, f"{canon}::{key}",
                        [(b.offsets, v) for b, v in flat_range_boxes(local_shape, segs, start, numel, flat)])
    flush()
    _set_optimizer_step(engine, optimizer_step)


def canonical_names_of(model) -> dict[str, str]:
    return canonical_names(model)


def load_full_state(engine, model, tensors: dict, moments: dict | None, optimizer_step: int,
                    groups: dict | None = None) -> None:
    """Write canonical fp32 master weights and Adam moments into an initialised engine (any ZeRO stage,
    any layout: each rank takes its own piece).  The module's working weights must already hold the
    checkpoint (load it into the full model before parallelising and building the engine)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    aliases = getattr(model, "canonical_aliases", {})
    names = {local: aliases.get(canon, canon) for local, canon in canonical_names_of(model).items()}
    params = dict(model.named_parameters())
    for local, p in params.items():
        if zero_managed(p):  # the fp32 master copy ZeRO steps from
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
            if zero_managed(p):
                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                adam_state(engine, p)[key].copy_(value)
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
