"""What to run: every valid layout of a GPU count ranked by estimated step time (``search``), and, when a
layout or a whole search does not fit, the first of the usual changes under which it does (``smallest_fix``).

One advice policy for both: the changes of ``FIXES`` in order, cheapest in GPUs first (more expert, tensor or
pipeline parallelism, recomputation, smaller micro-batches, ZeRO offload), then 2-16x the GPUs.  For one
layout each change is planned; after a search, the changes the search already varies (the layout and full
recomputation) are skipped and each remaining one is searched again.
"""
from __future__ import annotations

from dataclasses import dataclass

from sparselm.errors import ConfigError
from sparselm.planning.layouts import candidate_layouts, configure, routes_to_experts
from sparselm.planning.planner import plan_layout

GPU_FACTORS = (2, 4, 8, 16)
"""Multiples of the GPU count the advice tries last (data parallelism)."""


def search(cfg, world: int, gpu_mem_gb: float, host_mem_gb=None, device="gpu", assume=None,
           recompute_options=("none", "full"), cp_options=None):
    """(fitting plans ranked by estimated step time, refused layouts as ((tp, pp, ep, cp, recompute), reason),
    plans that do not fit).  Each layout of ``world`` is tried with each of ``recompute_options``
    (parallel.recompute) and context-parallel degree of ``cp_options`` (default: the config's parallel.cp)."""
    fitting, refused, too_big = [], [], []
    layouts = sorted(candidate_layouts(cfg, world, cp_options), key=lambda c: (c[3], c[0], c[2], c[1]))  # one model per (cp, tp, ep)
    for tp, pp, ep, cp in layouts:
        for ac in recompute_options:
            variant = configure(cfg, tp=tp, pp=pp, ep=ep, recompute=ac, cp=cp)
            try:
                plan = plan_layout(variant, world, gpu_mem_gb, host_mem_gb, device, assume)
            except ConfigError as err:
                refused.append(((tp, pp, ep, cp, ac), str(err)))
                continue
            (fitting if plan.fits else too_big).append(plan)
    fitting.sort(key=lambda p: (p.time["step_s"], max(r.gpu_bytes for r in p.ranks)))
    return fitting, refused, too_big


@dataclass(frozen=True)
class Fix:
    """One change the advice may propose."""

    changes: dict
    """Keyword arguments of ``layouts.configure``."""
    text: str
    """The change as the user passes it (overrides and a reason)."""
    searched: bool = False
    """Whether a search already varies it (the layout, full recomputation): skipped after a search."""


def fixes(cfg, world: int) -> list[Fix]:
    """The changes to try on ``cfg``'s layout, in order (without the GPU multiples, tried last)."""
    p = cfg.parallel
    micro = cfg.train.micro_batch_size or cfg.train.global_batch_size // max(1, world // (p.tp * p.pp))
    out = []
    if routes_to_experts(cfg):
        out.append(Fix({"ep": p.ep * 2}, f"--parallel.ep={p.ep * 2}", True))
    out += [Fix({"tp": p.tp * 2}, f"--parallel.tp={p.tp * 2}", True), Fix({"pp": p.pp * 2}, f"--parallel.pp={p.pp * 2}", True)]
    if p.recompute == "none":
        out.append(Fix({"recompute": "selective"}, "--parallel.recompute=selective (keeps matmul outputs, recomputes the rest)"))
    if p.recompute != "full":
        out.append(Fix({"recompute": "full"}, "--parallel.recompute=full (recomputes whole blocks in backward)", True))
        ac_pp = max(p.pp * 2, 2)
        out.append(Fix({"pp": ac_pp, "recompute": "full"}, f"--parallel.pp={ac_pp} --parallel.recompute=full", True))
    if micro > 1:
        out.append(Fix({"micro_batch": micro // 2}, f"--train.micro_batch_size={micro // 2}"))
    out += [Fix({"ds_config": "zero2_offload", "pp": 1}, "--parallel.ds_config=zero2_offload --parallel.pp=1"),
            Fix({"ds_config": "zero3_offload", "pp": 1, "ep": 1},
                "--parallel.ds_config=zero3_offload --parallel.pp=1 --parallel.ep=1")]
    return out


def smallest_fix(cfg, world: int, gpu_mem_gb, host_mem_gb=None, device="gpu", assume=None, searched: bool = False) -> str:
    """The first change of ``fixes`` (then 2-16x the GPUs) under which ``cfg``'s layout fits, as the overrides
    to pass; '' if none does.  ``searched``: advise after a search of every layout of ``world`` (skip the
    changes a search varies, search each remaining one, and name the best layout it finds)."""
    def fits(variant, n: int) -> str | None:
        """None if nothing fits, else what to add to the change's text."""
        try:
            if not searched:
                return "" if plan_layout(variant, n, gpu_mem_gb, host_mem_gb, device, assume).fits else None
            options = (variant.parallel.recompute,) if variant.parallel.recompute == "selective" else ("none", "full")
            best = search(variant, n, gpu_mem_gb, host_mem_gb, device, assume, options)[0]
        except ConfigError:
            return None
        if not best:
            return None
        lay = best[0].layout
        return f" (best there: tp={lay.tp} pp={lay.pp} ep={lay.ep}{f' cp={lay.cp}' if lay.cp > 1 else ''}{', recompute ' + best[0].cfg.parallel.recompute if best[0].cfg.parallel.recompute != 'none' else ''})"

    for fix in fixes(cfg, world):
        if searched and fix.searched:
            continue
        extra = fits(configure(cfg, **fix.changes), world)
        if extra is not None:
            return fix.text + extra
    for factor in GPU_FACTORS:
        extra = fits(cfg, world * factor)
        if extra is not None:
            return f"{world * factor} GPUs (data parallel x{factor}){extra}"
    return ""
