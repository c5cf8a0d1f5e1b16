"""ZeRO-3 construction: each parameter is partitioned the moment it is materialised.

Under ZeRO stage 3 ``deepspeed.initialize`` partitions every parameter it finds whole, so a model built
whole first would peak at this rank's whole pieces, however many ranks share them.  DeepSpeed's answer is
the ``deepspeed.zero.Init`` context, which partitions each module's parameters at the end of its
``__init__``; sparselm's construction already allocates one parameter at a time from the meta device
(``sparselm.parallel.materialize``), so ``Zero3Partitioner`` applies the same conversion right after each
parameter is filled: the peak is this rank's partitions plus one whole tensor (or one module's, while the
seeded init draws a module), and the engine later finds every parameter partitioned and keeps them (its
"zero-init model" path: no second cast, no broadcast; the values are already layout-free).

ZeRO-3 gathers a module's parameters together, so a MoE layer's routed experts, one module holding every
local expert, would be gathered whole: on a wide layer, far more than the rest of the step holds.
``prepare`` therefore splits each layer's experts into modules of ``parallel.zero3_experts_per_gather``
experts (``GroupedExperts.split_into_chunks``), as DeepSpeed's own MoE keeps one module per expert: a step
then holds one chunk of one layer's experts at a time.  Each chunk's weights are a ``Shard(0, "gather",
fixed=(i, n))`` piece of the canonical tensor, named back by ``canonical.unchunked``, so checkpoints keep
the canonical tensors and resume under any layout or stage.

Expert parameters of an expert-parallel model are tagged for DeepSpeed's AutoEP placement first
(``sparselm.parallel.expert.tag_experts_for_zero3``) and partitioned over their expert-data-parallel group,
the group the engine expects them in (``DeepSpeedEngine._resolve_zero3_param_placement``).
"""
from __future__ import annotations

import torch

from sparselm.parallel.deepspeed_private import zero3_converter
from sparselm.training.ds_config import working_dtype


class Zero3Partitioner:
    """Partition-at-materialise for ``build_sharded(..., partitioner=...)``: ``prepare(model)`` on the meta model
    (experts split into gather chunks, AutoEP tags on expert parameters, carried to the real ones), then
    ``partition(param)`` on each parameter as soon as it holds its values.  ``ds_config``: the resolved
    DeepSpeed config (stage 3); ``topo``: the run's ``Topology`` (its data-parallel group, expert-data-parallel
    group and mpu, as the engine gets them); ``experts_per_gather``: routed experts per gathered module (0:
    all of a layer's local experts in one)."""

    def __init__(self, ds_config: dict, topo, experts_per_gather: int = 1):
        self.dtype = working_dtype(ds_config)
        self.experts_per_gather = experts_per_gather
        self.expert_dp_group = topo.expert_dp_group if topo.ep > 1 else None
        self.convert = zero3_converter(ds_config, topo.dp_cp_group, mpu=topo.mpu, dtype=self.dtype)

    def prepare(self, model: torch.nn.Module) -> None:
        from sparselm.parallel.expert import moe_layers, tag_experts_for_zero3

        if self.experts_per_gather:
            for layer in moe_layers(model):
                local = layer.experts.num_local_experts
                if local > self.experts_per_gather:  # divides it (sparselm.training.zero_rules)
                    layer.experts.split_into_chunks(local // self.experts_per_gather, gather_chunk)
        tag_experts_for_zero3(model)

    @torch.no_grad()
    def partition(self, param: torch.nn.Parameter) -> None:
        if hasattr(param, "ds_id"):  # a tied or shared tensor, already partitioned
            return
        if getattr(param, "ds_zero_placement_family", None) == "autoep_expert":
            param.ds_zero_partition_process_group = self.expert_dp_group
        if param.dtype != self.dtype and param.is_floating_point():
            param.data = param.data.to(self.dtype)
        self.convert([param])


def gather_chunk(param: torch.nn.Parameter, index: int, count: int) -> torch.nn.Parameter:
    """Chunk ``index`` of ``count`` of ``param`` along dim 0 (its experts) as a new Parameter with ``param``'s
    attributes (tensor-parallel, expert and optimizer marks) and the cut added to its placements."""
    from sparselm.parallel.pieces import Shard, place

    rows = param.shape[0] // count
    chunk = torch.nn.Parameter(param.data.narrow(0, index * rows, rows).clone(), requires_grad=param.requires_grad)
    chunk.__dict__.update(param.__dict__)
    return place(chunk, Shard(0, "gather", fixed=(index, count)))
