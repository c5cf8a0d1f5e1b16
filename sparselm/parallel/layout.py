"""The parallel layout as pure arithmetic: rank <-> (pp, dp, tp, cp) coordinates and every group's ranks.

No process group is needed, so the rank maps and the layout checks are testable in one process.
Order: TP fastest, then CP, then DP, then PP -- megatron-core's default "tp-cp-ep-dp-pp" (ep = 1 there),
rank = tp + TP * (cp + CP * (dp + DP * pp)).  DeepSpeed's ``PipeModelDataParallelTopology`` (axes pipe, data,
model) sees the context-parallel ranks as data-parallel ones: its data coordinate is cp + CP * dp (context
parallel ranks hold the same parameters and their gradients are reduced together, as megatron's
``get_data_parallel_group(with_context_parallel=True)``).  Expert parallelism (DeepSpeed's) splits each such
data lane (fixed pp, tp) into consecutive blocks of ``ep`` ranks; the expert-data-parallel group joins the
ranks holding the same experts, as DeepSpeed's ``_get_expert_parallel_ranks`` does.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from sparselm.errors import require
from sparselm.model.registry import block_cost

AXES = ("tp", "dp", "pp", "mp", "ep", "edp", "cp", "dpcp")
"""Group kinds: tensor, data, pipeline, model (tp x pp), expert, expert-data, context parallel, and data x
context parallel (the ranks that reduce gradients together: DeepSpeed's data axis)."""


class Coord(NamedTuple):
    pp: int
    dp: int
    tp: int
    cp: int = 0


@dataclass(frozen=True)
class Layout:
    tp: int
    pp: int
    dp: int
    ep: int = 1
    cp: int = 1

    def __post_init__(self):
        if min(self.tp, self.pp, self.dp, self.ep, self.cp) < 1 or (self.dp * self.cp) % self.ep:
            raise ValueError(f"invalid layout {self}: sizes must be >= 1 and ep must divide dp * cp")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.cp

    def coord(self, rank: int) -> Coord:
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} outside a world of {self.world_size}")
        lane = self.dp * self.cp
        return Coord(pp=rank // (self.tp * lane), dp=rank // (self.tp * self.cp) % self.dp, tp=rank % self.tp,
                     cp=rank // self.tp % self.cp)

    def rank(self, pp: int, dp: int, tp: int, cp: int = 0) -> int:
        return tp + self.tp * (cp + self.cp * (dp + self.dp * pp))

    def data_index(self, rank: int) -> int:
        """The rank's place in its data lane (DeepSpeed's data coordinate): cp + CP * dp."""
        c = self.coord(rank)
        return c.cp + self.cp * c.dp

    def group(self, axis: str, rank: int) -> list[int]:
        """Ranks of the `axis` group that `rank` belongs to, in group-rank order."""
        c = self.coord(rank)
        lane = lambda i: self.rank(c.pp, i // self.cp, c.tp, i % self.cp)  # noqa: E731 - i-th rank of the data lane
        if axis == "tp":
            return [self.rank(c.pp, c.dp, t, c.cp) for t in range(self.tp)]
        if axis == "dp":
            return [self.rank(c.pp, d, c.tp, c.cp) for d in range(self.dp)]
        if axis == "cp":
            return [self.rank(c.pp, c.dp, c.tp, k) for k in range(self.cp)]
        if axis == "dpcp":
            return [lane(i) for i in range(self.dp * self.cp)]
        if axis == "pp":
            return [self.rank(p, c.dp, c.tp, c.cp) for p in range(self.pp)]
        if axis == "mp":
            return [self.rank(p, c.dp, t, c.cp) for p in range(self.pp) for t in range(self.tp)]
        i = self.data_index(rank)
        if axis == "ep":
            start = i - i % self.ep
            return [lane(j) for j in range(start, start + self.ep)]
        if axis == "edp":
            return [lane(j) for j in range(i % self.ep, self.dp * self.cp, self.ep)]
        raise ValueError(f"unknown axis {axis!r}; one of {AXES}")

    def groups(self, axis: str) -> list[list[int]]:
        """Every group of `axis`, ordered by their smallest rank."""
        seen: dict[int, list[int]] = {}
        for r in range(self.world_size):
            g = self.group(axis, r)
            seen.setdefault(min(g), g)
        return [seen[k] for k in sorted(seen)]

    def as_dict(self) -> dict:
        out = {"tp": self.tp, "pp": self.pp, "ep": self.ep, "dp": self.dp}
        return {**out, "cp": self.cp} if self.cp > 1 else out


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
    if p.cp > 1:
        check_context_parallel(cfg)
    for width, setting in feed_forward_widths(cfg):
        require(width % p.tp == 0, f"the feed-forward width {width} ({setting}) is not divisible by parallel.tp={p.tp}; "
                                   f"choose {setting.split(' ')[0]} so that it is a multiple of tp")


def check_context_parallel(cfg) -> None:
    """The rules of parallel.cp > 1 (and its parallel.cp_method); ConfigError naming the setting and the fix."""
    m, p, seq = cfg.model, cfg.parallel, cfg.data.seq_len
    heads, kv = m.n_heads // p.tp, m.kv_heads // p.tp
    if p.cp_method == "ulysses":
        require(heads % p.cp == 0, f"parallel.cp={p.cp} does not divide the {heads} query heads per tensor-parallel rank "
                                   f"(model.n_heads={m.n_heads} / parallel.tp={p.tp}): Ulysses gives each context-parallel "
                                   "rank whole heads; choose cp dividing them (or lower parallel.tp, or use "
                                   "parallel.cp_method=allgather)")
        require(kv % p.cp == 0 or p.cp % kv == 0,
                f"parallel.cp={p.cp} and the {kv} key/value heads per tensor-parallel rank (model.n_kv_heads={m.kv_heads} / "
                f"parallel.tp={p.tp}): one must divide the other (kv heads fewer than cp are replicated); change cp or "
                "tp, or use parallel.cp_method=allgather")
    pieces = p.cp if p.cp_method == "ulysses" else 2 * p.cp
    require(seq % pieces == 0, f"data.seq_len={seq} is not divisible by {pieces} (parallel.cp={p.cp}, "
                               f"parallel.cp_method={p.cp_method}): each context-parallel rank holds "
                               f"{'seq_len / cp tokens' if pieces == p.cp else 'two chunks of seq_len / (2 cp) tokens'}; "
                               f"pick a multiple of {pieces}")
    require(m.mtp_layers == 0, f"model.mtp_layers={m.mtp_layers} with parallel.cp > 1 is not supported yet (a depth reads "
                               "the tokens ahead, across the pieces' borders); set model.mtp_layers=0 or parallel.cp=1")
    require(m.attention != "mla", "model.attention=mla with parallel.cp > 1 is not supported yet (its shared rotary key "
                                  "is not exchanged by the context-parallel attention); set parallel.cp=1")
    kinds = set(m.layer_kinds())
    if "moe" in kinds:
        require(not cfg.moe.noisy_gating, "moe.noisy_gating=true with parallel.cp > 1 is not supported yet (its noise "
                                          "is keyed by token positions the pieces do not share); set parallel.cp=1")
        require(not cfg.moe.drop_tokens, "moe.drop_tokens=true with parallel.cp > 1 is not supported yet (capacity is "
                                         "per whole sequence); use dropless routing (moe.drop_tokens=false) or parallel.cp=1")
    if kinds & {"pkm", "pkm_ffn"}:
        require(cfg.pkm.query_norm != "batchnorm", "pkm.query_norm=batchnorm with parallel.cp > 1 is not supported "
                                                   "yet (its statistics are the rank's tokens'); use layernorm or parallel.cp=1")


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
    model_parallel = p.tp * p.pp * p.cp
    axes = "parallel.tp * parallel.pp" + (" * parallel.cp" if p.cp > 1 else "")
    require(world_size % model_parallel == 0, f"world size {world_size} is not divisible by {axes} = {model_parallel}; launch a multiple of {model_parallel} processes")
    dp = world_size // model_parallel
    require((dp * p.cp) % p.ep == 0, f"parallel.ep={p.ep} does not divide the data-parallel size {dp}"
            + (f" x parallel.cp={p.cp}" if p.cp > 1 else "") + f" (world {world_size} / tp {p.tp} / pp {p.pp}"
            + (" / cp" if p.cp > 1 else "") + f"); choose ep dividing {dp * p.cp}")
    require(t.global_batch_size % dp == 0, f"train.global_batch_size={t.global_batch_size} is not divisible by the data-parallel size {dp}; pick a multiple of {dp}")
    per_rank = t.global_batch_size // dp
    micro = t.micro_batch_size or per_rank
    require(per_rank % micro == 0, f"train.micro_batch_size={micro} does not divide the per-rank batch {per_rank} (global {t.global_batch_size} / dp {dp})")
    return dp


def validate_layout(cfg, world_size: int) -> Layout:
    """Check the layout against the world and the model; name the violated constraint."""
    check_layout_fits_model(cfg)
    dp = check_world(cfg, world_size)
    return Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, ep=cfg.parallel.ep, cp=cfg.parallel.cp)
