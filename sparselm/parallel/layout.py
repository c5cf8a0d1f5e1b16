"""The parallel layout as pure arithmetic: rank <-> (pp, dp, tp) coordinates and every group's ranks.

No process group is needed, so the rank maps and the layout checks are testable in one process.
Order: TP fastest, then DP, then PP -- megatron-core's default ("tp-cp-ep-dp-pp" with cp = ep = 1)
and DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data, model).  Expert parallelism
(DeepSpeed's) splits each data-parallel lane (fixed pp, tp) into consecutive blocks of ``ep`` ranks;
the expert-data-parallel group joins the ranks holding the same experts, as DeepSpeed's
``_get_expert_parallel_ranks`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from sparselm.errors import require
from sparselm.model.registry import block_cost

AXES = ("tp", "dp", "pp", "mp", "ep", "edp")
"""Group kinds: tensor, data, pipeline, model (tp x pp), expert, expert-data parallel."""


class Coord(NamedTuple):
    pp: int
    dp: int
    tp: int


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int = 1

    def __post_init__(self):
        if min(self.tp, self.pp, self.dp, self.ep) < 1 or self.dp % self.ep:
            raise ValueError(f"invalid layout {self}: sizes must be >= 1 and ep must divide dp")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        return Coord(pp=rank // (self.tp * self.dp), dp=rank // self.tp % self.dp, tp=rank % self.tp)

    def rank(self, pp: int, dp: int, tp: int) -> int:
        return tp + self.tp * (dp + self.dp * pp)

    def group(self, axis: str, rank: int) -> list[int]:
        """Ranks of the `axis` group that `rank` belongs to, in group-rank order."""
        c = self.coord(rank)
        if axis == "tp":
            return [self.rank(c.pp, c.dp, t) for t in range(self.tp)]
        if axis == "dp":
            return [self.rank(c.pp, d, c.tp) for d in range(self.dp)]
        if axis == "pp":
            return [self.rank(p, c.dp, c.tp) for p in range(self.pp)]
        if axis == "mp":
            return [self.rank(p, c.dp, t) for p in range(self.pp) for t in range(self.tp)]
        if axis == "ep":
            start = c.dp - c.dp % self.ep
            return [self.rank(c.pp, d, c.tp) for d in range(start, start + self.ep)]
        if axis == "edp":
            return [self.rank(c.pp, d, c.tp) for d in range(c.dp % self.ep, self.dp, self.ep)]
        raise ValueError(f"unknown axis {axis!r}; one of {AXES}")

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of `axis`, ordered by their smallest rank."""
        seen: dict[int, list[int]] = {}
        for r in range(self.world_size):
            g = self.group(axis, r)
            seen.setdefault(min(g), g)
        return [seen[k] for k in sorted(seen)]

    def as_dict(self) -> dict:
        return {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp}


def check_layout_fits_model(cfg) -> None:
    """The rules between the parallel layout and the model that need no world size, checked once here
    (``config.validate`` runs them at load time, ``validate_layout`` again with the world).
    Raises ConfigError naming the settings and the fix."""
    m, p = cfg.model, cfg.parallel
    require(m.n_layers >= p.pp, f"model.n_layers={m.n_layers} is fewer than parallel.pp={p.pp} pipeline stages; "
                                "every stage needs at least one layer, lower parallel.pp")
    require(m.n_heads % p.tp == 0 and m.kv_heads % p.tp == 0,
            f"parallel.tp={p.tp} must divide model.n_heads={m.n_heads} and the key/value heads ({m.kv_heads}): "
            "tensor parallelism gives each rank whole heads")
    require(not m.vocab_size or m.vocab_size % p.tp == 0,
            f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp} (vocab-parallel embedding and "
            "loss); set model.vocab_size=0 to derive a padded size, or pad to a multiple of tp")
    for width, setting in feed_forward_widths(cfg):
        require(width % p.tp == 0, f"the feed-forward width {width} ({setting}) is not divisible by parallel.tp={p.tp}; "
                                   f"choose {setting.split(' ')[0]} so that it is a multiple of tp")


def feed_forward_widths(cfg) -> list[tuple[int, str]]:
    """(hidden width, the setting that gives it) of every SwiGLU the model builds that tensor parallelism
    splits by hidden units, each once, from the kinds' cost models (``BlockCost.tp_widths``; routed experts
    too unless parallel.moe_tp_mode='rows' keeps them whole).  Raises ConfigError naming a kind without one."""
    widths = []
    for kind in dict.fromkeys(cfg.model.layer_kinds()):
        for width in block_cost(kind).tp_widths(cfg):
            if width not in widths:
                widths.append(width)
    return widths


def check_world(cfg, world_size: int) -> int:
    """Validate the layout against the world size; return the data-parallel size."""
    p, t = cfg.parallel, cfg.train
    model_parallel = p.tp * p.pp
    require(world_size % model_parallel == 0, f"world size {world_size} is not divisible by parallel.tp * parallel.pp = {model_parallel}; launch a multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    require(dp % p.ep == 0, f"parallel.ep={p.ep} does not divide the data-parallel size {dp} (world {world_size} / tp {p.tp} / pp {p.pp}); choose ep dividing {dp}")
    require(t.global_batch_size % dp == 0, f"train.global_batch_size={t.global_batch_size} is not divisible by the data-parallel size {dp}; pick a multiple of {dp}")
    per_rank = t.global_batch_size // dp
    micro = t.micro_batch_size or per_rank
    require(per_rank % micro == 0, f"train.micro_batch_size={micro} does not divide the per-rank batch {per_rank} (global {t.global_batch_size} / dp {dp})")
    return dp


def validate_layout(cfg, world_size: int) -> Layout:
    """Check the layout against the world and the model; name the violated constraint."""
    check_layout_fits_model(cfg)
    dp = check_world(cfg, world_size)
    return Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, ep=cfg.parallel.ep)
