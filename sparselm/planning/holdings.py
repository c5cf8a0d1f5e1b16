"""Exact: what each rank of a layout holds, counted by the construction's own rules on the meta device.

``stage_holdings`` runs ``parallelize`` on a meta model for rank r of the layout through
``topology.VirtualTopology`` (no process group) and ``materialize.held_pieces`` (``build_sharded`` without
materialising; pipeline stages by ``pipeline.stage_bounds``, DeepSpeed's partition), so its counts equal what
``build_sharded`` gives that rank (tests/distributed/test_sharded_construction.py); the optimizer groups are the
trainer's own (``engine.optimizer_groups``).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import yaml

from sparselm.config import to_dict
from sparselm.model import build_model
from sparselm.parallel import parallelize
from sparselm.parallel.materialize import held_pieces
from sparselm.parallel.topology import VirtualTopology
from sparselm.training.engine import optimizer_groups

KINDS = ("embedding", "attention", "dense_ffn", "experts", "pkm_values", "persistent_memory", "other")
"""The planner's parameter kinds, in the order plans print them."""


def kind_of(name: str) -> str:
    """The planner's kind (one of ``KINDS``) of a canonical parameter name such as
    ``layers.3.ffn.experts.gate_up_proj``."""
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
    evenly or refuse).  Counts are elements (parameters)."""

    params: int
    """Parameters one rank of the stage holds."""
    by_kind: dict
    """``KINDS`` name -> parameters of that kind."""
    expert: int
    """Parameters partitioned over the expert-data-parallel group (DeepSpeed MoE parameters: ``allreduce`` False)."""
    largest_module: int
    """Parameters of the largest module (its own, not its children's)."""
    largest_gathered: int
    """The largest module as ZeRO-3 gathers it: routed experts in modules of
    ``parallel.zero3_experts_per_gather`` (``sparselm.parallel.zero3``)."""
    largest_tensor: int
    """Elements of the largest parameter tensor."""
    groups: dict
    """Optimizer parameter group name -> (parameters, expert group?) as the trainer builds them."""
    layers: list
    """Indices of the blocks the stage holds."""
    first: bool
    """Whether the stage holds the embedding (pipeline stage 0)."""
    last: bool
    """Whether the stage holds the output head (the last pipeline stage)."""


@contextlib.contextmanager
def one_thread():
    """Run the body with torch on one thread: meta construction is many tiny tensor ops (rotary tables), and
    threads only oversubscribe the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def model_key(cfg) -> str:
    """The settings a model's construction reads (not the layout's, training's or data's), as YAML text: equal
    keys build equal models."""
    d = to_dict(cfg)
    return yaml.safe_dump({k: d[k] for k in ("model", "moe", "pkm", "attention")})


_MODELS: dict = {}


def _parallel_model(cfg, topo):
    """The meta model parallelised for ``topo``'s tp/ep, one kept at a time (a search asks for the same one
    for every pp)."""
    key = (model_key(cfg), topo.tp, topo.ep, cfg.parallel.moe_tp_mode)
    if key not in _MODELS:
        _MODELS.clear()
        with one_thread():
            _MODELS[key] = parallelize(build_model(cfg, device="meta"), cfg, topo)
    return _MODELS[key]


def stage_holdings(cfg, layout) -> list[StageHold]:
    """One ``StageHold`` per pipeline stage of ``layout`` (a ``parallel.layout.Layout``) for ``cfg`` (parallel.*
    set to the layout, model.vocab_size resolved)."""
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
        out.append(StageHold(params=sum(by_kind.values()), by_kind=by_kind,
                             expert=sum(p.numel() for p in pieces.values() if getattr(p, "allreduce", True) is False),
                             largest_module=max(modules.values(), default=0),
                             largest_gathered=max(gathered.values(), default=0),
                             largest_tensor=max((p.numel() for p in pieces.values()), default=0), groups=groups,
                             layers=layers, first=any(n.startswith("embed.") for n in pieces),
                             last=any(n.startswith("head.") for n in pieces)))
    return out
