"""The plan of one layout: what a configuration needs per GPU on a cluster, on paper.

``plan_layout`` runs the trainer's start-up checks (``layouts.check``), counts what each rank holds exactly
(``holdings``), and estimates, with every assumption stated (``assumptions.Assumptions``), each rank's memory
(``memory``), the bytes each rank sends (``communication``) and the step time (``step_time``); then judges
whether it fits the GPUs' and hosts' memory.  The search over layouts and the advice when nothing fits are in
``advice``, the printing and the command line (``python -m sparselm.plan``) in ``report``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass

from sparselm.planning.assumptions import Assumptions, GiB
from sparselm.planning.communication import communication_bytes
from sparselm.planning.holdings import stage_holdings
from sparselm.planning.layouts import check
from sparselm.planning.memory import precision_bytes, rank_memory
from sparselm.planning.step_time import step_time


@dataclass
class Plan:
    """A layout's plan: its checks passed, each rank's holdings and memory, communication and step time."""

    cfg: object
    """The config, set to the layout (model.vocab_size resolved)."""
    layout: object
    """The ``parallel.layout.Layout``."""
    ds: dict
    """The DeepSpeed config the trainer would build."""
    device: str
    """'gpu', or 'cpu' for ranks that are CPU processes (everything in host memory)."""
    stages: list
    """``holdings.StageHold`` per pipeline stage."""
    ranks: list
    """``memory.RankPlan`` per rank."""
    micro_batch: int
    """Sequences per micro-batch."""
    micro_batches: int
    """Micro-batches per optimizer step on one data-parallel rank."""
    zero_stage: int
    """The ZeRO stage the trainer runs (0 when pipeline stages hold different optimizer groups)."""
    notes: list
    """Remarks printed with the plan."""
    comm: dict
    """Bytes one rank of the busiest stage sends per step, by collective and group."""
    time: dict
    """The step time estimate (``step_time.step_time``)."""
    fits: bool = False
    """Whether every rank fits the GPU (and, when given, host) memory."""
    why: str = ""
    """What does not fit, when it does not."""

    def as_dict(self, per_rank: bool = True) -> dict:
        """The plan as JSON-ready data (layout, ZeRO, batch, fit, time, peaks; with ``per_rank`` each rank's
        parameters and bytes)."""
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
    """The plan of ``cfg``'s layout (parallel.tp/pp/ep, ds_config, train.micro_batch_size) on ``world`` ranks of
    ``gpu_mem_gb`` GiB each (``host_mem_gb``: GiB of host memory per node, checked when given).
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
    w = precision_bytes(ds)
    per_rank = cfg.train.global_batch_size // layout.dp
    micro = cfg.train.micro_batch_size or per_rank
    m_batches = per_rank // micro
    ranks = [rank_memory(cfg, layout, stages[layout.coord(r).pp], r, stage_no, offload_opt, offload_param, w, micro,
                         m_batches, device, assume) for r in range(layout.world_size)]
    # a context-parallel rank holds micro * seq_len / cp tokens of each micro-batch
    comm = communication_bytes(cfg, layout, stages, stage_no, w, w, m_batches, micro * cfg.data.seq_len // layout.cp)
    time = step_time(cfg, layout, stages, comm, assume, m_batches, offload_opt, w)
    plan = Plan(cfg=cfg, layout=layout, ds=ds, device=device, stages=stages, ranks=ranks, micro_batch=micro,
                micro_batches=m_batches, zero_stage=stage_no, notes=notes, comm=comm, time=time)
    plan.fits, plan.why = judge(plan, gpu_mem_gb, host_mem_gb, assume)
    return plan


def judge(plan: Plan, gpu_mem_gb: float, host_mem_gb: float | None, assume: Assumptions) -> tuple[bool, str]:
    """(fits, why not) of ``plan`` against ``gpu_mem_gb`` GiB per GPU and ``host_mem_gb`` GiB per node (the
    node's ranks: ``assume.gpus_per_node`` or the world, whichever is smaller)."""
    worst_gpu = max(r.gpu_bytes for r in plan.ranks)
    per_node = min(assume.gpus_per_node, plan.layout.world_size)
    worst_host = max(r.host_bytes for r in plan.ranks) * per_node
    why = []
    if plan.device == "gpu" and worst_gpu > gpu_mem_gb * GiB:
        why.append(f"needs {worst_gpu / GiB:.1f} GiB per GPU of {gpu_mem_gb:g}")
    if host_mem_gb and worst_host > host_mem_gb * GiB:
        why.append(f"needs {worst_host / GiB:.1f} GiB of host memory per node of {host_mem_gb:g}")
    return not why, "; ".join(why)
