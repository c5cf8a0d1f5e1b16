"""The live parallel layout: megatron-core groups, DeepSpeed's topology and expert groups, in agreement.

``Topology(cfg)`` (after torch.distributed is initialised, e.g. by ``sparselm.training.runtime.init_distributed``)
- validates the layout against the world size and the model (``layout.validate_layout``);
- creates megatron-core ``parallel_state`` groups (TP, CP, DP, PP) for tensor parallelism;
- builds DeepSpeed's ``PipeModelDataParallelTopology`` (what a ``PipelineModule`` is given), whose data axis
  holds the data x context-parallel ranks (``layout``);
- creates DeepSpeed's expert-parallel groups under its own name ``ep_size_<ep>``, so
  ``deepspeed.moe.layer.MoE(ep_size=ep)`` finds and uses them (it creates none of its own);
- checks on every rank that megatron-core, DeepSpeed and ``Layout`` agree on every coordinate and group,
  failing on all ranks together if not.

Expert groups lie inside one data-parallel lane (same pp stage and tp rank), as DeepSpeed lays them out
for expert tensor parallelism.  DeepSpeed's global ``expert_tensor_parallel_world_size`` is left at 1: a
value > 1 makes its gating drop duplicate tokens across the TP group and gather them back with an
all-gather that gloo rejects, and leaves the expert gradients partial on each TP rank; token
de-duplication across TP is the expert-parallel code's decision (``sparselm.parallel.expert``).

``teardown()`` destroys what this object created so a test can build another layout in-process.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sparselm.parallel.layout import Coord, Layout, validate_layout


class Topology:
    def __init__(self, cfg):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
        from megatron.core import parallel_state as ps

        if not dist.is_initialized():
            raise RuntimeError("Topology needs torch.distributed initialised first (sparselm.training.runtime.init_distributed)")
        if ps.model_parallel_is_initialized():
            raise RuntimeError("megatron-core parallel_state is already initialised in this process; "
                               "call teardown() on the previous Topology first")
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.layout: Layout = validate_layout(cfg, self.world_size)
        self.tp, self.pp, self.dp, self.ep = self.layout.tp, self.layout.pp, self.layout.dp, self.layout.ep
        self.cp = self.layout.cp
        self.coord: Coord = self.layout.coord(self.rank)
        ensure_deepspeed_comm()

        # gloo is already every group's backend on CPU; megatron's extra gloo copies would only add start-up time.
        ps.initialize_model_parallel(tensor_model_parallel_size=self.tp, pipeline_model_parallel_size=self.pp,
                                     context_parallel_size=self.cp, create_gloo_process_groups=False,
                                     # typed int, used only as timedelta(minutes=...): fractions hold
                                     distributed_timeout_minutes=cfg.parallel.timeout_minutes)
        from sparselm.parallel.mpu import ParallelStateMPU

        self._ps_mpu = ParallelStateMPU()
        self.ds_topology = PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp * self.cp)
        self.ep_group_name = f"ep_size_{self.ep}"
        self._create_expert_groups()
        self._check_agreement()

    # ------------------------------------------------------------------ groups and coordinates
    @property
    def tp_rank(self) -> int:
        return self.coord.tp

    @property
    def dp_rank(self) -> int:
        return self.coord.dp

    @property
    def dp_size(self) -> int:
        return self.dp

    @property
    def cp_rank(self) -> int:
        return self.coord.cp

    @property
    def dp_cp_size(self) -> int:
        """Ranks that reduce gradients and metrics together: data x context parallel (DeepSpeed's data axis)."""
        return self.dp * self.cp

    @property
    def is_first_stage(self) -> bool:
        return self.coord.pp == 0

    @property
    def is_last_stage(self) -> bool:
        return self.coord.pp == self.pp - 1

    @property
    def tp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_tensor_model_parallel_group()

    @property
    def dp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group()

    @property
    def cp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_context_parallel_group()

    @property
    def dp_cp_group(self):
        """The data x context-parallel group (``dp_cp_size`` ranks): gradients, statistics and metrics."""
        from megatron.core import parallel_state as ps

        return ps.get_data_parallel_group(with_context_parallel=True)

    @property
    def pp_group(self):
        from megatron.core import parallel_state as ps

        return ps.get_pipeline_model_parallel_group()

    @property
    def ep_group(self):
        from sparselm.parallel.deepspeed_private import expert_parallel_group

        return expert_parallel_group(self.ep_group_name)

    @property
    def expert_dp_group(self):
        """Ranks holding the same experts: expert gradients are averaged over this group."""
        from sparselm.parallel.deepspeed_private import expert_data_parallel_group

        return expert_data_parallel_group(self.ep_group_name)

    @property
    def mpu(self):
        """For ``deepspeed.initialize(mpu=...)``: the parallel_state adapter without pipeline stages; None
        with them (DeepSpeed then takes its grid from the PipelineModule, built on ``ds_topology``)."""
        return self._ps_mpu if self.pp == 1 else None

    @property
    def parallel_state_mpu(self):
        """The parallel_state adapter in every layout; its model-parallel group spans TP and PP ranks."""
        return self._ps_mpu

    def as_dict(self) -> dict:
        return self.layout.as_dict()

    def __repr__(self) -> str:
        return f"Topology(rank {self.rank}/{self.world_size}, {self.as_dict()}, {self.coord})"

    # ------------------------------------------------------------------ set-up and teardown
    def _create_expert_groups(self) -> None:
        from sparselm.parallel import deepspeed_private as dsp

        if dsp.expert_groups_exist(self.ep_group_name):
            raise RuntimeError(f"DeepSpeed expert groups '{self.ep_group_name}' already exist in this process; "
                               "call teardown() on the previous Topology first")
        dsp.create_expert_groups(self.ep, mpu=self._ps_mpu)

    def _check_agreement(self) -> None:
        """Every rank compares megatron-core's coordinates of all ranks and its own groups with DeepSpeed's
        topology and expert groups and with ``Layout``; all ranks raise together on any mismatch."""
        from megatron.core import parallel_state as ps

        from sparselm.parallel.deepspeed_private import expert_group_ranks

        mine = torch.tensor([ps.get_pipeline_model_parallel_rank(), ps.get_data_parallel_rank(),
                             ps.get_tensor_model_parallel_rank(), ps.get_context_parallel_rank()], dtype=torch.long)
        every = [torch.zeros_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        problems = []
        for r, coords in enumerate(every):
            megatron = Coord(*coords.tolist())
            c = self.ds_topology.get_coord(r)  # DeepSpeed's data coordinate is cp + CP * dp
            deepspeed = Coord(pp=c.pipe, dp=c.data // self.cp, tp=c.model, cp=c.data % self.cp)
            if not megatron == deepspeed == self.layout.coord(r):
                problems.append(f"rank {r}: megatron {megatron}, deepspeed {deepspeed}, layout {self.layout.coord(r)}")
        ds_axis = {"tp": "model", "dpcp": "data", "pp": "pipe"}
        live = {"tp": ps.get_tensor_model_parallel_group(), "dp": ps.get_data_parallel_group(),
                "cp": ps.get_context_parallel_group(), "dpcp": ps.get_data_parallel_group(with_context_parallel=True),
                "pp": ps.get_pipeline_model_parallel_group(), "mp": ps.get_model_parallel_group(),
                "ep": self.ep_group, "edp": self.expert_dp_group}
        for axis, group in live.items():
            expected = self.layout.group(axis, self.rank)
            found = {"live": dist.get_process_group_ranks(group)}
            if axis in ds_axis:
                found["deepspeed topology"] = next(g for g in self.ds_topology.get_axis_comm_lists(ds_axis[axis]) if self.rank in g)
            if axis in ("ep", "edp"):
                found["deepspeed groups"] = expert_group_ranks(self.ep_group_name)[axis == "edp"]
            for source, ranks in found.items():
                if sorted(ranks) != sorted(expected):
                    problems.append(f"rank {self.rank} {axis} group: {source} {ranks}, layout {expected}")
        failed = torch.tensor([float(bool(problems))])
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if failed.item():
            raise RuntimeError("parallel layouts disagree (megatron-core vs DeepSpeed vs sparselm.parallel.layout):\n"
                               + ("\n".join(problems) or f"rank {self.rank} agrees; see the other ranks' errors"))

    def teardown(self) -> None:
        """Destroy megatron-core's parallel_state and the expert groups so another Topology can be built."""
        import deepspeed.comm
        from megatron.core import parallel_state as ps

        from sparselm.parallel.deepspeed_private import forget_mpu

        for group in {id(g): g for g in (self.ep_group, self.expert_dp_group)}.values():
            deepspeed.comm.destroy_process_group(group)  # also drops DeepSpeed's references to it
        forget_mpu(self._ps_mpu)
        ps.destroy_model_parallel()


def ensure_deepspeed_comm() -> None:
    """DeepSpeed's group helpers go through deepspeed.comm: wrap the existing torch process group once (no-op
    when deepspeed.comm is already initialised).  Call after ``torch.distributed.init_process_group``."""
    import deepspeed.comm

    if not deepspeed.comm.is_initialized():
        deepspeed.comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)


class VirtualTopology:
    """Rank ``rank`` of ``layout`` on paper: what ``parallelize`` and the pipeline partition read from a
    ``Topology`` (sizes, coordinates, DeepSpeed's topology, groups as ``pieces.VirtualGroup``), with no
    process group, so a planner can cut any rank's pieces on the meta device (``materialize.held_pieces``).
    The groups are ``Layout``'s, which ``Topology`` checks megatron-core and DeepSpeed agree with."""

    def __init__(self, layout: Layout, rank: int):
        from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

        self.layout, self.rank, self.world_size = layout, rank, layout.world_size
        self.tp, self.pp, self.dp, self.ep, self.cp = layout.tp, layout.pp, layout.dp, layout.ep, layout.cp
        self.coord: Coord = layout.coord(rank)
        self.ds_topology = PipeModelDataParallelTopology(num_pp=self.pp, num_mp=self.tp, num_dp=self.dp * self.cp)

    @classmethod
    def for_config(cls, cfg, world_size: int, rank: int) -> "VirtualTopology":
        """Validated as ``Topology`` validates (ConfigError naming the broken rule)."""
        return cls(validate_layout(cfg, world_size), rank)

    def group(self, axis: str):
        from sparselm.parallel.pieces import VirtualGroup

        return VirtualGroup(tuple(self.layout.group(axis, self.rank)), self.rank)

    tp_group = property(lambda self: self.group("tp"))
    dp_group = property(lambda self: self.group("dp"))
    cp_group = property(lambda self: self.group("cp"))
    dp_cp_group = property(lambda self: self.group("dpcp"))
    dp_cp_size = property(lambda self: self.dp * self.cp)
    cp_rank = property(lambda self: self.coord.cp)
    pp_group = property(lambda self: self.group("pp"))
    ep_group = property(lambda self: self.group("ep"))
    expert_dp_group = property(lambda self: self.group("edp"))

    def as_dict(self) -> dict:
        return self.layout.as_dict()

    def __repr__(self) -> str:
        return f"VirtualTopology(rank {self.rank}/{self.world_size}, {self.as_dict()}, {self.coord})"
