"""A layout planner: what a configuration needs per GPU on a cluster, on paper.

    python -m sparselm.plan --config moe_1b --gpus 8 --gpu-mem 80 [--tp T --pp P --ep E --ds-config NAME
        --micro-batch M] [--section.key=value ...] [--search] [--json]

Exact where it can be: the parameters each rank holds are counted by the construction's own rules
(``parallelize`` on the meta device for rank r of the layout, through ``topology.VirtualTopology`` and
``materialize.held_pieces``; pipeline stages by ``pipeline.stage_bounds``, DeepSpeed's partition), so they
equal what ``build_sharded`` gives that rank.  Everything derived from those counts by DeepSpeed's rules
(ZeRO partitioning over data-parallel and expert-data-parallel groups, offload) is arithmetic.  Estimated,
and printed as such with every assumption (``Assumptions``, each settable by ``--name value``):
activations, the optimizer step's workspace, runtime overheads, communication time and step time.

Model states per rank (P: its parameters; d: ZeRO's partition degree, dp for dense parameters and dp / ep
for experts; w: bytes of a weight, 2 under bf16/fp16, 4 in fp32; L: its largest module), as DeepSpeed's
``estimate_zero2/3_model_states_mem_needs``:
- ZeRO-0: weights wP, gradients wP, fp32 master 4P (when w < 4), Adam 8P, fp32 gradients 4P (when w < 4);
- ZeRO-1: weights wP, gradients wP, master + Adam + fp32 gradients 16P/d (DeepSpeed keeps the fp32
  partition and its gradient even when the weights are fp32);
- ZeRO-2: as ZeRO-1 with the w-byte gradients partitioned, wP/d; with offload_optimizer the 16P/d go to host
  and the gradients are reduced straight into it;
- ZeRO-3: weights wP/d, 16P/d, and 4L of gathered weights and gradients (L counting a layer's routed experts
  in the modules ZeRO-3 gathers them in, ``parallel.zero3_experts_per_gather``); offload_optimizer moves
  the 16P/d to host, offload_param the weights too.
Peak = runtime + model states + the larger of (activations of the micro-batches in flight + ZeRO-3's
gathered layer) and the optimizer step's workspace (one fp32 temporary of the largest parameter group's
partition: torch's AdamW, foreach=False, on DeepSpeed's flat groups).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
from dataclasses import dataclass, field

from sparselm.data.vocab import derive_vocab_size
from sparselm.errors import USER_ERRORS, ConfigError

GiB = 1024**3
KINDS = ("embedding", "attention", "dense_ffn", "experts", "pkm_values", "persistent_memory", "other")


@dataclass
class Assumptions:
    peak_tflops: float = 989.0
    """Peak dense matmul TFLOP/s of one GPU at the run's precision (H100 SXM bf16: 989)."""
    mfu: float = 0.40
    """Fraction of peak the model's matmuls reach (model FLOPs utilisation)."""
    nvlink_gbs: float = 450.0
    """GB/s one GPU sends to the others of its node (H100 NVLink 4: 450 each way)."""
    network_gbs: float = 50.0
    """GB/s one GPU sends to other nodes (one 400 Gb/s NIC per GPU)."""
    pcie_gbs: float = 25.0
    """GB/s between one GPU and host memory (offload)."""
    cpu_adam_gparams_s: float = 1.0
    """Billions of parameters one rank's CPU Adam (DeepSpeedCPUAdam) updates per second under offload."""
    gpus_per_node: int = 8
    """GPUs per node: decides which groups communicate over NVLink and which over the network."""
    gpu_runtime_gb: float = 2.5
    """GPU memory besides tensors: CUDA context, NCCL buffers, allocator fragmentation (GiB)."""
    host_process_gb: float = 0.4
    """Host memory of one rank before the model: imports, process groups, data (GiB; tools/bench_memory.py
    measured 0.39 on the project's CPU machine)."""
    overlap_dp: float = 0.0
    """Fraction of the data-parallel gradient communication hidden behind backward compute (0: none)."""


# ----------------------------------------------------------------------------- exact: what each rank holds
def kind_of(name: str) -> str:
    """The planner's kind of a canonical parameter name."""
    last = name.rsplit(".", 2)
    if name.startswith(("embed.", "head.proj.")):
        return "embedding"
    if ".ffn.experts." in name:
        return "experts"
    if name.endswith((".attn.memory_k", ".attn.memory_v")):
        return "persistent_memory"
    if ".attn." in name and last[-2].endswith("_proj"):
        return "attention"
    if name.endswith(".values"):
        return "pkm_values"
    if ".ffn." in name and last[-2] in ("gate_proj", "up_proj", "down_proj"):
        return "dense_ffn"  # dense SwiGLU and shared experts
    return "other"  # norms, routers, PKM keys / queries / gates


@dataclass
class StageHold:
    """What every rank of one pipeline stage holds (ranks of a stage hold equal shares: the rules split
    evenly or refuse)."""
    params: int
    by_kind: dict
    expert: int
    """Parameters partitioned over the expert-data-parallel group (DeepSpeed MoE parameters: ``allreduce`` False)."""
    largest_module: int
    largest_gathered: int
    """The largest module as ZeRO-3 gathers it: routed experts in modules of
    ``parallel.zero3_experts_per_gather`` (``sparselm.parallel.zero3``)."""
    largest_tensor: int
    groups: dict
    """Optimizer parameter group name -> (parameters, expert group?) as the trainer builds them."""
    layers: list
    first: bool
    last: bool
    memory_slots: int = 0


_MODELS: dict = {}


@contextlib.contextmanager
def _one_thread():
    """Meta construction is many tiny tensor ops (rotary tables): threads only oversubscribe the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _short_tables(cfg):
    """``cfg`` with a short rotary table: ``model.max_seq_len`` sizes only that buffer (real even on the meta
    device: 2 GiB for 120 layers at 16k), never a parameter; the tests compare against full-length builds."""
    cfg = copy.deepcopy(cfg)
    cfg.model.max_seq_len = min(cfg.model.max_seq_len, 16)
    return cfg


def _parallel_model(cfg, topo):
    from sparselm.model import build_model
    from sparselm.parallel import parallelize

    key = (_model_key(cfg), topo.tp, topo.ep, cfg.parallel.moe_tp_mode)
    if key not in _MODELS:
        _MODELS.clear()  # one at a time
        with _one_thread():
            _MODELS[key] = parallelize(build_model(_short_tables(cfg), device="meta"), cfg, topo)
    return _MODELS[key]


def _model_key(cfg) -> str:
    """The settings a model's construction reads (not the layout's, training's or data's)."""
    import yaml

    from sparselm.config import to_dict

    d = to_dict(cfg)
    return yaml.safe_dump({k: d[k] for k in ("model", "moe", "pkm", "attention")})


def stage_holdings(cfg, layout) -> list[StageHold]:
    """One ``StageHold`` per pipeline stage of ``layout`` for ``cfg`` (parallel.* set to the layout)."""
    import torch

    from sparselm.training.engine import optimizer_groups
    from sparselm.parallel.materialize import held_pieces
    from sparselm.parallel.topology import VirtualTopology

    out = []
    for stage in range(layout.pp):
        topo = VirtualTopology(layout, layout.rank(pp=stage, dp=0, tp=0))
        pieces = held_pieces(cfg, topo, _parallel_model(cfg, topo))
        by_kind = dict.fromkeys(KINDS, 0)
        modules: dict[str, int] = {}
        for name, p in pieces.items():
            by_kind[kind_of(name)] += p.numel()
            owner = name.rsplit(".", 1)[0]
            modules[owner] = modules.get(owner, 0) + p.numel()
        gathered, per = dict(modules), cfg.parallel.zero3_experts_per_gather
        for owner in modules:
            experts = pieces.get(f"{owner}.gate_up_proj")
            if owner.endswith(".experts") and experts is not None and per and experts.shape[0] > per:
                gathered[owner] = modules[owner] * per // experts.shape[0]
        holder = torch.nn.ParameterList(pieces.values())
        groups = {g["name"]: (sum(p.numel() for p in g["params"]), bool(g.get("moe"))) for g in optimizer_groups(holder, cfg)}
        layers = sorted({int(n.split(".")[1]) for n in pieces if n.startswith("layers.")})
        slots = [p.shape[1] for n, p in pieces.items() if n.endswith(".attn.memory_k")]
        out.append(StageHold(params=sum(by_kind.values()), by_kind=by_kind,
                             expert=sum(p.numel() for p in pieces.values() if getattr(p, "allreduce", True) is False),
                             largest_module=max(modules.values(), default=0),
                             largest_gathered=max(gathered.values(), default=0),
                             largest_tensor=max((p.numel() for p in pieces.values()), default=0), groups=groups,
                             layers=layers, first=any(n.startswith("embed.") for n in pieces),
                             last=any(n.startswith("head.") for n in pieces), memory_slots=max(slots, default=0)))
    return out


# ----------------------------------------------------------------------------- the layout and its checks
def configure(cfg, tp: int | None = None, pp: int | None = None, ep: int | None = None, ds_config: str | None = None,
              micro_batch: int | None = None, recompute: str | None = None):
    """A copy of ``cfg`` with the layout settings replaced (None keeps the config's)."""
    cfg = copy.deepcopy(cfg)
    p = cfg.parallel
    for name, value in (("tp", tp), ("pp", pp), ("ep", ep), ("ds_config", ds_config), ("recompute", recompute)):
        if value is not None:
            setattr(p, name, value)
    if micro_batch is not None:
        cfg.train.micro_batch_size = micro_batch
    return cfg


def check(cfg, world: int, cuda: bool = True):
    """Every start-up check the trainer makes on the layout, the config and the DeepSpeed JSON for a world of
    ``world`` ranks -> (Layout, DeepSpeed config).  Raises ConfigError naming every broken rule."""
    from sparselm.config import validate
    from sparselm.training.engine import build_ds_config
    from sparselm.parallel.layout import Layout
    from sparselm.training.preflight import check_layout

    check_layout(cfg, world)
    derive_vocab_size(cfg)
    validate(cfg)
    dp = world // (cfg.parallel.tp * cfg.parallel.pp)
    ds = build_ds_config(cfg, dp, cuda=cuda)
    return Layout(tp=cfg.parallel.tp, pp=cfg.parallel.pp, dp=dp, ep=cfg.parallel.ep), ds


# ----------------------------------------------------------------------------- estimates
def _precision_bytes(ds) -> int:
    from sparselm.training.ds_config import working_dtype

    return working_dtype(ds).itemsize


def _block_elems(kind: str, cfg, t: int, a: int, slots: int) -> float:
    """Activation elements one block saves for backward per token (at ``a`` bytes each; fp32 parts scaled)."""
    from sparselm.model.moe.config import resolved_expert_hidden

    m, s = cfg.model, cfg.data.seq_len
    d, qd, kvd = m.d_model, m.n_heads * m.head_width, m.kv_heads * m.head_width
    # norm input and output; q and k before and after rotary, v, attention output (flash/flex kernels keep
    # no scores; persistent memory adds its keys and values to every sequence)
    attn = 2 * d + (3 * qd + 3 * kvd) / t + 2 * kvd * slots / s / t
    if kind == "allattn":
        return attn
    ffn = 2 * d
    swiglu = lambda hidden: 4 * hidden / t  # gate, up, silu(gate), their product
    if kind in ("dense", "pkm_ffn"):
        ffn += swiglu(m.ffn_hidden)
    if kind in ("pkm", "pkm_ffn"):
        p = cfg.pkm
        ffn += p.heads * (2 * p.k_dim + 2 * round(math.sqrt(p.n_keys)) + p.knn * p.knn + 2 * p.knn) + 4 * (p.v_dim or d) / t
    if kind == "moe":
        e, k, h = cfg.moe.num_experts, cfg.moe.top_k, resolved_expert_hidden(cfg)
        ffn += 2 * e * 4 / a + 2 * k * d + k * swiglu(h) + cfg.moe.num_shared_experts * swiglu(h)
    return attn + ffn


def _block_matmul_elems(kind: str, cfg, t: int, a: int) -> float:
    """Elements per token of the weight-matmul outputs of one block, which selective recomputation keeps, plus
    the block's input (kept by every recomputed block)."""
    from sparselm.model.moe.config import resolved_expert_hidden

    m = cfg.model
    d, qd, kvd = m.d_model, m.n_heads * m.head_width, m.kv_heads * m.head_width
    keep = d + (qd + 2 * kvd) / t + d  # input; q, k, v projections; output projection
    swiglu = lambda hidden: 2 * hidden / t + d  # noqa: E731  gate and up projections, down projection
    if kind in ("dense", "pkm_ffn"):
        keep += swiglu(m.ffn_hidden)
    if kind in ("pkm", "pkm_ffn"):
        p = cfg.pkm
        keep += p.heads * (p.k_dim + 2 * round(math.sqrt(p.n_keys))) + 2 * (p.v_dim or d) / t
    if kind == "moe":
        e, k, h = cfg.moe.num_experts, cfg.moe.top_k, resolved_expert_hidden(cfg)
        keep += e * 4 / a + k * swiglu(h) + cfg.moe.num_shared_experts * swiglu(h)
    return keep


def stage_activations(cfg, layers: list[int], t: int, a: int, slots: int, ends: float) -> dict:
    """Activation elements per token of one micro-batch on a stage holding blocks ``layers``, under each
    parallel.recompute mode (with the config's recompute_every): {mode: (kept from forward to backward, the
    largest block rebuilt at a time in backward)}.  ``ends``: embedding and head elements."""
    from sparselm.model.recompute import recomputed_layers

    kinds = cfg.model.layer_kinds()
    chosen = set(recomputed_layers(cfg.model.n_layers, cfg.parallel.recompute_every))
    whole = {i: _block_elems(kinds[i], cfg, t, a, slots) for i in layers}
    kept = {i: min(whole[i], _block_matmul_elems(kinds[i], cfg, t, a)) for i in layers}
    plain = sum(v for i, v in whole.items() if i not in chosen) + ends
    mine = [i for i in layers if i in chosen]
    return {"none": (sum(whole.values()) + ends, 0.0),
            "full": (plain + cfg.model.d_model * len(mine), max((whole[i] for i in mine), default=0.0)),
            "selective": (plain + sum(kept[i] for i in mine), max((whole[i] - kept[i] for i in mine), default=0.0))}


def _attention_span(cfg) -> float:
    """Keys an average query attends to (causal: half the sequence; sparse patterns: their budget)."""
    a, s = cfg.attention, cfg.data.seq_len
    span = {"causal": s / 2, "sliding_window": min(a.window, s / 2), "strided": min(s / 2, a.stride + s / a.stride),
            "fixed": min(s / 2, a.stride + a.summary * s / max(a.stride, 1)),
            "block_local": min(s / 2, a.block * a.window_blocks),
            "bigbird": min(s / 2, a.block * (a.global_blocks + a.window_blocks + a.random_blocks))}.get(a.pattern, s / 2)
    return span


@dataclass
class RankPlan:
    rank: int
    stage: int
    params: int
    by_kind: dict
    gpu: dict = field(default_factory=dict)
    """Component -> bytes on the GPU."""
    host: dict = field(default_factory=dict)
    activations: dict = field(default_factory=dict)
    checkpoint_bytes: int = 0

    @property
    def gpu_bytes(self) -> int:
        return int(sum(self.gpu.values()))

    @property
    def host_bytes(self) -> int:
        return int(sum(self.host.values()))


@dataclass
class Plan:
    cfg: object
    layout: object
    ds: dict
    device: str
    stages: list
    ranks: list
    micro_batch: int
    micro_batches: int
    zero_stage: int
    notes: list
    comm: dict
    time: dict
    fits: bool = False
    why: str = ""

    def as_dict(self, per_rank: bool = True) -> dict:
        out = {**self.layout.as_dict(), "ds_config": self.cfg.parallel.ds_config, "zero_stage": self.zero_stage,
               "micro_batch": self.micro_batch, "micro_batches": self.micro_batches,
               "recompute": self.cfg.parallel.recompute, "recompute_every": self.cfg.parallel.recompute_every,
               "fits": self.fits, "why": self.why, "step_time_s": self.time["step_s"],
               "peak_gpu_bytes": max(r.gpu_bytes for r in self.ranks), "peak_host_bytes": max(r.host_bytes for r in self.ranks),
               "comm_bytes_per_step": self.comm, "time": self.time, "notes": self.notes}
        if per_rank:
            out["ranks"] = [{"rank": r.rank, "stage": r.stage, "params": r.params, "gpu_bytes": r.gpu_bytes,
                             "host_bytes": r.host_bytes, "checkpoint_bytes": r.checkpoint_bytes} for r in self.ranks]
        return out


def plan_layout(cfg, world: int, gpu_mem_gb: float, host_mem_gb: float | None = None, device: str = "gpu",
                assume: Assumptions | None = None) -> Plan:
    """The plan of ``cfg``'s layout (parallel.tp/pp/ep, ds_config, train.micro_batch_size) on ``world`` ranks.
    ``device='cpu'``: the ranks are CPU processes (everything in host memory, as on the project's machines).
    Raises ConfigError naming every rule the layout breaks."""
    assume = assume or Assumptions()
    cfg = copy.deepcopy(cfg)
    layout, ds = check(cfg, world, cuda=device == "gpu")
    zero = ds["zero_optimization"]
    notes = []
    stages = stage_holdings(cfg, layout)
    stage_no = zero.get("stage", 0)
    if layout.pp > 1 and stage_no > 0 and len({tuple(sorted(s.groups)) for s in stages}) > 1:
        notes.append("pipeline stages hold different parameter groups: the trainer runs ZeRO stage 0 "
                     "(engine.settle_pipeline_zero_stage)")
        stage_no = 0
    offload_opt = zero.get("offload_optimizer", {}).get("device", "none") == "cpu"
    offload_param = zero.get("offload_param", {}).get("device", "none") == "cpu"
    w = _precision_bytes(ds)
    a = w  # activations in the weights' precision
    per_rank = cfg.train.global_batch_size // layout.dp
    micro = cfg.train.micro_batch_size or per_rank
    m_batches = per_rank // micro
    tokens = micro * cfg.data.seq_len
    edp = layout.dp // layout.ep
    t = layout.tp
    mode = cfg.parallel.recompute

    ranks = []
    for r in range(layout.world_size):
        stage = layout.coord(r).pp
        s = stages[stage]
        dense, expert = s.params - s.expert, s.expert
        part = dense / layout.dp + expert / edp if stage_no >= 1 else dense + expert  # ZeRO's partition of P
        states = {}
        states["weights"] = w * (part if stage_no == 3 else s.params)
        if stage_no <= 1:
            states["gradients"] = w * s.params
        elif stage_no == 2 and not offload_opt:  # offloaded: reduced straight into the host's fp32 partition
            states["gradients"] = w * part
        if stage_no == 0:
            states["fp32 master + Adam + fp32 gradients"] = (16 if w < 4 else 8) * s.params
        else:
            states["fp32 master + Adam + fp32 gradients"] = 16 * part
        if stage_no == 3:
            states["gathered layer (ZeRO-3)"] = 4 * s.largest_gathered
        gpu, host = {}, {}
        for key, value in states.items():
            to_host = (offload_opt and key.startswith("fp32")) or (offload_param and key == "weights")
            (host if to_host else gpu)[key] = value
        # activations of one micro-batch under each recomputation mode: kept ones for every micro-batch in
        # flight, plus one recomputed block rebuilt at a time in backward
        ends = (cfg.model.d_model if s.first else 0) + ((2 * cfg.model.d_model + cfg.model.vocab_size / t * (a + 8) / a) if s.last else 0)
        modes = {m: (tokens * a * kept, tokens * a * rebuilt)
                 for m, (kept, rebuilt) in stage_activations(cfg, s.layers, t, a, s.memory_slots, ends).items()}
        in_flight = min(layout.pp - stage, m_batches) if layout.pp > 1 else 1
        act = modes[mode][0] * in_flight + modes[mode][1]
        if stage_no >= 1:
            workspace = 4 * max((n / (edp if moe else layout.dp) for n, moe in s.groups.values()), default=0)
        else:
            workspace = 4 * s.largest_tensor
        if offload_opt:  # DeepSpeedCPUAdam updates in place, on the host
            workspace = 0
        transient = max(act, workspace)
        (gpu if device == "gpu" else host)["activations / step workspace"] = transient
        if device == "gpu":
            gpu["runtime"] = assume.gpu_runtime_gb * GiB
            host["process"] = assume.host_process_gb * GiB
        else:
            host.update(gpu)
            gpu = {}
            host["process"] = assume.host_process_gb * GiB
        rp = RankPlan(rank=r, stage=stage, params=s.params, by_kind=s.by_kind, gpu=gpu, host=host,
                      activations={"per_micro_batch": modes["none"][0], "per_micro_batch_full": modes["full"][0],
                                   "per_micro_batch_selective": modes["selective"][0], "recompute": mode,
                                   "in_flight": in_flight, "peak": act, "step_workspace": workspace},
                      checkpoint_bytes=int(12 * (dense / layout.dp + expert / edp)))
        ranks.append(rp)

    comm = _communication(cfg, layout, stages, stage_no, w, a, micro, m_batches, tokens)
    time = _step_time(cfg, layout, stages, comm, assume, m_batches, offload_opt, w)
    plan = Plan(cfg=cfg, layout=layout, ds=ds, device=device, stages=stages, ranks=ranks, micro_batch=micro,
                micro_batches=m_batches, zero_stage=stage_no, notes=notes, comm=comm, time=time)
    _judge(plan, gpu_mem_gb, host_mem_gb, assume)
    return plan


def _judge(plan: Plan, gpu_mem_gb: float, host_mem_gb: float | None, assume: Assumptions) -> None:
    worst_gpu = max(r.gpu_bytes for r in plan.ranks)
    per_node = min(assume.gpus_per_node, plan.layout.world_size)
    worst_host = max(r.host_bytes for r in plan.ranks) * per_node
    why = []
    if plan.device == "gpu" and worst_gpu > gpu_mem_gb * GiB:
        why.append(f"needs {worst_gpu / GiB:.1f} GiB per GPU of {gpu_mem_gb:g}")
    if host_mem_gb and worst_host > host_mem_gb * GiB:
        why.append(f"needs {worst_host / GiB:.1f} GiB of host memory per node of {host_mem_gb:g}")
    plan.fits, plan.why = not why, "; ".join(why)


def _bus(size: float, n: int, kind: str) -> float:
    """Bytes one rank sends for a collective on ``size`` bytes over ``n`` ranks (ring algorithms)."""
    if n <= 1:
        return 0.0
    return size * (2 * (n - 1) / n if kind == "all-reduce" else (n - 1) / n)


def _communication(cfg, layout, stages, zero_stage, w, a, micro, m_batches, tokens) -> dict:
    """Bytes one rank of the busiest stage sends per optimizer step, by collective and group."""
    kinds = cfg.model.layer_kinds()
    d, t = cfg.model.d_model, layout.tp
    best = {}
    for s in stages:
        c = {"all-reduce tp": 0.0, "all-to-all ep": 0.0, "send/recv pp": 0.0, "all-reduce dp": 0.0,
             "reduce-scatter dp": 0.0, "all-gather dp": 0.0, "all-reduce tied": 0.0}
        act = tokens * d * a
        for i in s.layers:
            k = kinds[i]
            per_layer = 2 if k != "allattn" else 1  # attention, plus the feed-forward slot
            c["all-reduce tp"] += 2 * per_layer * _bus(act, t, "all-reduce")
            if k == "moe":
                routed = act * cfg.moe.top_k
                if t > 1:
                    c["all-reduce tp"] += 2 * _bus(routed, t, "all-reduce")
                c["all-to-all ep"] += 4 * _bus(routed, layout.ep, "all-to-all")
        if s.first or s.last:
            c["all-reduce tp"] += 2 * _bus(act, t, "all-reduce")
        c = {key: value * m_batches for key, value in c.items()}
        if layout.pp > 1:
            c["send/recv pp"] = 2 * act * m_batches * (1 if (s.first or s.last) else 2) / 2
            if s.first or s.last:
                tied = cfg.model.tie_embeddings and s.by_kind["embedding"]
                c["all-reduce tied"] = _bus(w * cfg.model.vocab_size / t * d, 2, "all-reduce") if tied else 0.0
        dense, expert, edp = (s.params - s.expert) * w, s.expert * w, layout.dp // layout.ep
        for size, n in ((dense, layout.dp), (expert, edp)):
            if zero_stage == 0:
                c["all-reduce dp"] += _bus(size, n, "all-reduce")
            elif zero_stage in (1, 2):
                c["reduce-scatter dp"] += _bus(size, n, "reduce-scatter") * (m_batches if zero_stage == 2 else 1)
                c["all-gather dp"] += _bus(size, n, "all-gather")
            else:
                c["reduce-scatter dp"] += _bus(size, n, "reduce-scatter") * m_batches
                c["all-gather dp"] += 2 * _bus(size, n, "all-gather") * m_batches
        if sum(c.values()) >= sum(best.values()):
            best = c
    return {k: int(v) for k, v in best.items()}


def _intra_node(layout, axis: str, per_node: int) -> bool:
    return all(len({r // per_node for r in group}) == 1 for group in layout.groups(axis))


_ACTIVE: dict = {}


def _active_matmul_params(key: str, cfg) -> int:
    """Parameters one token multiplies by (the model's own ``num_params(active=True)``, less the embedding
    lookup when untied)."""
    if key not in _ACTIVE:
        from sparselm.model import build_model

        with _one_thread():
            model = build_model(_short_tables(cfg), device="meta")
        _ACTIVE[key] = model.num_params(active=True) - (0 if cfg.model.tie_embeddings else model.embed.weight.numel())
    return _ACTIVE[key]


def _step_time(cfg, layout, stages, comm, assume, m_batches, offload_opt, w) -> dict:
    """Estimated seconds per optimizer step: compute at mfu x peak, communication over the stated bandwidths
    (not overlapped unless ``overlap_dp``), the pipeline bubble, CPU Adam and PCIe under offload."""
    from sparselm.planning.flops import flop_counts

    active = _active_matmul_params(_model_key(cfg), cfg)
    # persistent memory slots are parameters every token reads: counted in ``active``, not here
    m = cfg.model  # a sliding layer's queries see at most its window
    spans = sum(min(m.layer_window(i), cfg.data.seq_len / 2) if m.layer_window(i) else _attention_span(cfg)
                for i in range(m.n_layers))
    tokens = cfg.train.global_batch_size * cfg.data.seq_len
    # 6 FLOPs per parameter and token (forward and backward), 12 d per attended context key and token;
    # recomputation repeats what sparselm.planning.flops says of the model's FLOPs (hardware FLOPs, not model FLOPs)
    flops = (6 * active + 12 * m.n_heads * m.head_width * spans) * tokens
    counts = flop_counts(cfg)
    recomputed = flops * counts.recompute_per_token / counts.per_token
    compute = (flops + recomputed) / layout.world_size / (assume.peak_tflops * 1e12 * assume.mfu)
    bubble = (layout.pp - 1) / m_batches if layout.pp > 1 else 0.0
    bw = lambda axis: (assume.nvlink_gbs if _intra_node(layout, axis, assume.gpus_per_node) else assume.network_gbs) * 1e9
    comm_s = {"tp": comm["all-reduce tp"] / bw("tp"), "ep": comm["all-to-all ep"] / bw("ep"),
              "pp": (comm["send/recv pp"] + comm["all-reduce tied"]) / bw("pp"),
              "dp": (comm["all-reduce dp"] + comm["reduce-scatter dp"] + comm["all-gather dp"]) / bw("dp")
              * (1 - assume.overlap_dp)}
    offload = 0.0
    if offload_opt:
        s = max(stages, key=lambda s: s.params)
        part = (s.params - s.expert) / layout.dp + s.expert / (layout.dp // layout.ep)
        offload = part / (assume.cpu_adam_gparams_s * 1e9) + (4 + w) * part / (assume.pcie_gbs * 1e9)
    step = compute * (1 + bubble) + sum(comm_s.values()) + offload
    return {"step_s": step, "compute_s": compute, "bubble_fraction": bubble, "comm_s": comm_s, "offload_s": offload,
            "model_flops_per_step": flops, "recompute_flops_per_step": recomputed, "active_params": active}


# ----------------------------------------------------------------------------- search and advice
def candidate_layouts(cfg, world: int):
    """(tp, pp, ep) triples whose sizes multiply into ``world`` (ep dividing dp), before the rules."""
    for tp in range(1, world + 1):
        if world % tp:
            continue
        for pp in range(1, world // tp + 1):
            if (world // tp) % pp:
                continue
            dp = world // tp // pp
            for ep in range(1, dp + 1):
                if dp % ep == 0 and (ep == 1 or "moe" in cfg.model.layer_kinds()):
                    yield tp, pp, ep


def search(cfg, world: int, gpu_mem_gb: float, host_mem_gb=None, device="gpu", assume=None,
           recompute_options=("none", "full")):
    """(fitting plans ranked by estimated step time, refused layouts with their reasons, plans that do not
    fit).  Each layout is tried with each of ``recompute_options`` (parallel.recompute)."""
    fitting, refused, too_big = [], [], []
    for tp, pp, ep in sorted(candidate_layouts(cfg, world), key=lambda c: (c[0], c[2], c[1])):  # one model per (tp, ep)
        for ac in recompute_options:
            variant = configure(cfg, tp=tp, pp=pp, ep=ep, recompute=ac)
            try:
                plan = plan_layout(variant, world, gpu_mem_gb, host_mem_gb, device, assume)
            except ConfigError as err:
                refused.append(((tp, pp, ep, ac), str(err)))
                continue
            (fitting if plan.fits else too_big).append(plan)
    fitting.sort(key=lambda p: (p.time["step_s"], max(r.gpu_bytes for r in p.ranks)))
    return fitting, refused, too_big


def smallest_fix(cfg, world: int, gpu_mem_gb, host_mem_gb=None, device="gpu", assume=None) -> str:
    """The first of the usual changes (more ep, tp, pp, recomputation, offload, smaller
    micro-batches, more GPUs) under which the layout fits, as the overrides to pass; '' if none does."""
    p = cfg.parallel
    micro = cfg.train.micro_batch_size or cfg.train.global_batch_size // max(1, world // (p.tp * p.pp))
    tries = []
    if "moe" in cfg.model.layer_kinds():
        tries.append(({"ep": p.ep * 2}, f"--parallel.ep={p.ep * 2}"))
    tries += [({"tp": p.tp * 2}, f"--parallel.tp={p.tp * 2}"), ({"pp": p.pp * 2}, f"--parallel.pp={p.pp * 2}")]
    if p.recompute == "none":
        tries.append(({"recompute": "selective"}, "--parallel.recompute=selective (keeps matmul outputs, recomputes the rest)"))
    if p.recompute != "full":
        tries.append(({"recompute": "full"}, "--parallel.recompute=full (recomputes whole blocks in backward)"))
        ac_pp = max(p.pp * 2, 2)
        tries.append(({"pp": ac_pp, "recompute": "full"}, f"--parallel.pp={ac_pp} --parallel.recompute=full"))
    if micro > 1:
        tries.append(({"micro_batch": micro // 2}, f"--train.micro_batch_size={micro // 2}"))
    tries += [({"ds_config": "zero2_offload", "pp": 1}, "--parallel.ds_config=zero2_offload --parallel.pp=1"),
              ({"ds_config": "zero3_offload", "pp": 1, "ep": 1}, "--parallel.ds_config=zero3_offload --parallel.pp=1 --parallel.ep=1")]
    for change, text in tries:
        try:
            if plan_layout(configure(cfg, **change), world, gpu_mem_gb, host_mem_gb, device, assume).fits:
                return text
        except ConfigError:
            continue
    for factor in (2, 4, 8, 16):
        try:
            if plan_layout(cfg, world * factor, gpu_mem_gb, host_mem_gb, device, assume).fits:
                return f"{world * factor} GPUs (data parallel x{factor})"
        except ConfigError:
            continue
    return ""


def nearest_valid_worlds(cfg, world: int, limit: int = 64) -> list[int]:
    """GPU counts near ``world`` (within ``limit``) with at least one layout the start-up checks accept."""
    found = []
    for delta in range(1, limit + 1):
        for n in (world - delta, world + delta):
            if n < 1 or n in found:
                continue
            for tp, pp, ep in candidate_layouts(cfg, n):
                try:
                    check(configure(cfg, tp=tp, pp=pp, ep=ep), n)
                except ConfigError:
                    continue
                found.append(n)
                break
        if len(found) >= 2:
            break
    return sorted(found)


# ----------------------------------------------------------------------------- printing
def _gb(x: float) -> str:
    return f"{x / GiB:.2f}"


def _human(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_plan(plan: Plan) -> str:
    lay, lines = plan.layout, []
    lines.append(f"layout tp={lay.tp} pp={lay.pp} ep={lay.ep} dp={lay.dp} ({lay.world_size} {plan.device.upper()}s), "
                 f"ds_config={plan.cfg.parallel.ds_config} (ZeRO-{plan.zero_stage}, {_precision_bytes(plan.ds) * 8}-bit weights), "
                 f"micro-batch {plan.micro_batch} x {plan.micro_batches}, recomputation {plan.cfg.parallel.recompute}"
                 f"{' every ' + str(plan.cfg.parallel.recompute_every) + ' block(s)' if plan.cfg.parallel.recompute != 'none' else ''}")
    firsts = {}
    for r in plan.ranks:
        firsts.setdefault(r.stage, r)
    last = lay.pp - 1
    middle = [firsts[s] for s in range(1, last)]
    seen = {"stage 0": firsts[0]}
    if middle:
        worst = max(middle, key=lambda r: r.gpu_bytes + r.host_bytes)
        seen[f"stage {worst.stage}" if len(middle) == 1 else f"stages 1-{last - 1}: max, {worst.stage}"] = worst
    if last:
        seen[f"stage {last}"] = firsts[last]
    lines.append("per rank (every rank of a stage alike; GiB = 2^30 bytes):")
    header = ["", *seen]
    rows = [["params (exact)", *[_human(r.params) for r in seen.values()]]]
    for kind in KINDS:
        rows.append([f"  {kind}", *[_human(r.by_kind[kind]) for r in seen.values()]])
    components = []
    for r in seen.values():
        for key in list(r.gpu) + list(r.host):
            if key not in components:
                components.append(key)
    for key in components:
        cells = []
        for r in seen.values():
            where = "GPU" if key in r.gpu else "host" if key in r.host else ""
            cells.append(f"{_gb((r.gpu.get(key) if key in r.gpu else r.host.get(key, 0)))} {where}".strip())
        rows.append([key, *cells])
    rows.append(["GPU total", *[_gb(r.gpu_bytes) for r in seen.values()]])
    rows.append(["host total", *[_gb(r.host_bytes) for r in seen.values()]])
    rows.append(["activations / micro-batch", *[_gb(r.activations["per_micro_batch"]) for r in seen.values()]])
    rows.append(["  with full recomputation", *[_gb(r.activations["per_micro_batch_full"]) for r in seen.values()]])
    rows.append(["  with selective recomputation", *[_gb(r.activations["per_micro_batch_selective"]) for r in seen.values()]])
    rows.append(["  micro-batches in flight", *[str(r.activations["in_flight"]) for r in seen.values()]])
    rows.append(["checkpoint share (fp32 + Adam)", *[_gb(r.checkpoint_bytes) for r in seen.values()]])
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        lines.append("  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(row)))
    lines.append("communication per step, bytes one rank sends (busiest stage): "
                 + ", ".join(f"{k} {_gb(v)} GiB" for k, v in plan.comm.items() if v))
    tm = plan.time
    lines.append(f"step time (estimate): {tm['step_s']:.3f} s = compute {tm['compute_s']:.3f} s x (1 + bubble "
                 f"{tm['bubble_fraction']:.3f}) + communication "
                 + " + ".join(f"{k} {v:.3f}" for k, v in tm["comm_s"].items()) + f" + offload {tm['offload_s']:.3f}"
                 + f" ({_human(tm['model_flops_per_step'])} FLOPs, {_human(tm['active_params'])} active matmul parameters per token)")
    for note in plan.notes:
        lines.append(f"note: {note}")
    lines.append(f"fits: {'yes' if plan.fits else 'NO: ' + plan.why}")
    return "\n".join(lines)


def format_assumptions(assume: Assumptions) -> str:
    docs = _field_docs(Assumptions)
    return "assumptions (set with --name value):\n" + "\n".join(
        f"  --{f.name.replace('_', '-')} {getattr(assume, f.name)}: {docs.get(f.name, '')}" for f in dataclasses.fields(assume))


def _field_docs(cls) -> dict:
    from sparselm.config import field_docs

    return field_docs(cls)


# ----------------------------------------------------------------------------- entry point
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m sparselm.plan", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="preset name or YAML path")
    parser.add_argument("--gpus", type=int, required=True, help="GPUs (ranks) in the job")
    parser.add_argument("--gpu-mem", type=float, default=80.0, help="GiB of memory per GPU")
    parser.add_argument("--host-mem", type=float, default=None, help="GiB of host memory per node (checked when given)")
    parser.add_argument("--tp", type=int, default=None)
    parser.add_argument("--pp", type=int, default=None)
    parser.add_argument("--ep", type=int, default=None)
    parser.add_argument("--ds-config", default=None, help="DeepSpeed JSON name or path (parallel.ds_config)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per micro-batch (train.micro_batch_size)")
    parser.add_argument("--device", choices=("gpu", "cpu"), default="gpu",
                        help="cpu: the ranks are CPU processes (everything in host memory; the step time still "
                             "uses --peak-tflops)")
    parser.add_argument("--search", action="store_true", help="rank every valid layout of --gpus that fits")
    parser.add_argument("--top", type=int, default=8, help="layouts printed by --search")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")
    defaults = Assumptions()
    for f in dataclasses.fields(Assumptions):
        parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name),
                            help=_field_docs(Assumptions).get(f.name))
    args, overrides = parser.parse_known_args(argv)
    assume = Assumptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Assumptions)})

    from sparselm.config import load_config
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    if args.gpus < 1 or args.gpu_mem <= 0:
        parser.exit(2, "sparselm.plan: error: --gpus must be >= 1 and --gpu-mem > 0\n")
    try:
        cfg = load_config(args.config, overrides, check=False)
        cfg = configure(cfg, args.tp, args.pp, args.ep, args.ds_config, args.micro_batch)
        result = _run(cfg, args, assume)
    except USER_ERRORS as err:
        parser.exit(2, f"sparselm.plan: error: {err}\n")
    if args.json:
        print(json.dumps(result))
    return result


def _run(cfg, args, assume) -> dict:
    world, out = args.gpus, print
    out(format_assumptions(assume))
    if not args.search:
        try:
            plan = plan_layout(cfg, world, args.gpu_mem, args.host_mem, args.device, assume)
        except ConfigError as err:
            near = nearest_valid_worlds(cfg, world) if "world size" in str(err) or "data-parallel size" in str(err) else []
            hint = f"; GPU counts with a valid layout nearby: {', '.join(map(str, near))}" if near else ""
            raise ConfigError(f"this layout cannot run: {err}{hint}") from None
        out(format_plan(plan))
        result = {"fits": plan.fits, **plan.as_dict()}
        if not plan.fits:
            fix = smallest_fix(cfg, world, args.gpu_mem, args.host_mem, args.device, assume)
            result["smallest_fix"] = fix
            out(f"smallest change that fits: {fix}" if fix else
                "no single change tried fits (ep, tp, pp, recomputation, micro-batch, offload, up to 16x the GPUs)")
        return result
    fitting, refused, too_big = search(cfg, world, args.gpu_mem, args.host_mem, args.device, assume)
    if not fitting and not too_big:
        near = nearest_valid_worlds(cfg, world)
        reasons = sorted({reason for _, reason in refused})[:3]
        raise ConfigError(f"no layout of {world} GPUs passes the start-up checks (e.g. {' | '.join(reasons)})"
                          + (f"; GPU counts with a valid layout nearby: {', '.join(map(str, near))}" if near else ""))
    out(f"{len(fitting)} of {len(fitting) + len(too_big)} valid layouts of {world} GPUs fit "
        f"({len(refused)} refused by the start-up checks); ranked by estimated step time:")
    out("  rank  tp  pp  ep   dp  recompute  ZeRO  GPU GiB  host GiB  step s  bubble  why not")
    for i, p in enumerate(fitting[:args.top] + sorted(too_big, key=lambda p: max(r.gpu_bytes for r in p.ranks))[:3]):
        lay = p.layout
        out(f"  {str(i + 1) if p.fits else '-':>4}  {lay.tp:>2}  {lay.pp:>2}  {lay.ep:>2}  {lay.dp:>3}  "
            f"{p.cfg.parallel.recompute:>9}  {p.zero_stage:>4}  "
            f"{max(r.gpu_bytes for r in p.ranks) / GiB:>7.1f}  {max(r.host_bytes for r in p.ranks) / GiB:>8.1f}  "
            f"{p.time['step_s']:>6.2f}  {p.time['bubble_fraction']:>6.2f}  {p.why}")
    result = {"fits": bool(fitting), "gpus": world, "layouts": [p.as_dict() for p in fitting],
              "refused": [{"tp": tp, "pp": pp, "ep": ep, "recompute": ac, "why": why}
                          for (tp, pp, ep, ac), why in refused]}
    if fitting:
        out("best layout:")
        out(format_plan(fitting[0]))
    else:
        fix = ""
        for factor in (2, 4, 8, 16):
            more, _, _ = search(cfg, world * factor, args.gpu_mem, args.host_mem, args.device, assume)
            if more:
                fix = f"{world * factor} GPUs (best there: tp={more[0].layout.tp} pp={more[0].layout.pp} ep={more[0].layout.ep})"
                break
        if not fix:
            for ds in ("zero2_offload", "zero3_offload"):
                if search(configure(cfg, ds_config=ds), world, args.gpu_mem, args.host_mem, args.device, assume)[0]:
                    fix = f"--parallel.ds_config={ds}"
                    break
        result["smallest_fix"] = fix
        out("no layout fits; smallest change that fits: " + (fix or "none found up to 16x the GPUs or with offload"))
    return result


if __name__ == "__main__":
    main()
