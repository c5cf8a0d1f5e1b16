"""The layouts a planner may propose: (tp, pp, ep, cp) choices of a GPU count, a config set to one, and the
trainer's own start-up checks on it (``preflight.check_layout``, ``config.validate``, the DeepSpeed JSON's
rules through ``engine.build_ds_config``), so that a plan is only ever made for a layout the trainer accepts."""
from __future__ import annotations

import copy

from sparselm.config import validate
from sparselm.data.vocab import derive_vocab_size
from sparselm.errors import ConfigError
from sparselm.model.registry import block_cost
from sparselm.parallel.layout import Layout
from sparselm.training.engine import build_ds_config
from sparselm.training.preflight import check_layout


def configure(cfg, tp: int | None = None, pp: int | None = None, ep: int | None = None, ds_config: str | None = None,
              micro_batch: int | None = None, recompute: str | None = None, cp: int | None = None):
    """A copy of ``cfg`` with the layout settings replaced (parallel.tp/pp/ep/cp/ds_config/recompute,
    train.micro_batch_size); None keeps the config's."""
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep), ("cp", cp), ("ds_config", ds_config), ("recompute", recompute)):
        if value is not None:
            setattr(p, name, value)
    if micro_batch is not None:
        cfg.train.micro_batch_size = micro_batch
    return cfg


def check(cfg, world: int, cuda: bool = True) -> tuple[Layout, dict]:
    """Every start-up check the trainer makes on the layout, the config and the DeepSpeed JSON for a world of
    ``world`` ranks -> (Layout, DeepSpeed config dict).  Resolves model.vocab_size in place when it is 0.
    Raises ConfigError naming every broken rule."""
    check_layout(cfg, world)
    derive_vocab_size(cfg)
    validate(cfg)
    p = cfg.parallel
    dp = world // (p.tp * p.pp * p.cp)
    ds = build_ds_config(cfg, dp, cuda=cuda)
    return Layout(tp=p.tp, pp=p.pp, dp=dp, ep=p.ep, cp=p.cp), ds


def routes_to_experts(cfg) -> bool:
    """Whether some block routes tokens to experts (its cost model's ``routed_copies``): only then is expert
    parallelism (ep > 1) a layout to try."""
    return any(block_cost(kind).routed_copies(cfg) for kind in set(cfg.model.layer_kinds()))


def candidate_layouts(cfg, world: int, cp_options=None):
    """Yield (tp, pp, ep, cp) whose sizes multiply into ``world`` times dp (ep dividing dp x cp: experts fold
    over data and context ranks; ep > 1 only for a model with routed experts), before the rules.  ``cp_options``: the
    context-parallel degrees to try (default: the config's parallel.cp)."""
    experts = routes_to_experts(cfg)
    for cp in cp_options or (cfg.parallel.cp,):
        for tp in range(1, world + 1):
            if world % (tp * cp):
                continue
            for pp in range(1, world // (tp * cp) + 1):
                if (world // (tp * cp)) % pp:
                    continue
                dp = world // tp // pp // cp
                for ep in range(1, dp * cp + 1):
                    if (dp * cp) % ep == 0 and (ep == 1 or experts):
                        yield tp, pp, ep, cp


def nearest_valid_worlds(cfg, world: int, limit: int = 64) -> list[int]:
    """GPU counts near ``world`` (within ``limit``; the two nearest found) with at least one layout the
    start-up checks accept, ascending."""
    found = []
    for delta in range(1, limit + 1):
        for n in (world - delta, world + delta):
            if n < 1 or n in found:
                continue
            for tp, pp, ep, cp in candidate_layouts(cfg, n):
                try:
                    check(configure(cfg, tp=tp, pp=pp, ep=ep, cp=cp), n)
                except ConfigError:
                    continue
                found.append(n)
                break
        if len(found) >= 2:
            break
    return sorted(found)
