"""Parallelism applied from outside the model: topology, tensor, expert and pipeline parallelism.

``parallelize(model, cfg, topo)`` is the one call the trainer makes on a built model:
1. tensor-parallel layers are swapped in (megatron-core);
2. MoE layers are sharded over the expert-parallel group (DeepSpeed's groups) and, under tensor
   parallelism, their routed rows are split over the TP ranks instead of computed on each
   (``parallel.moe_tp_dedup``);
3. layers that keep statistics (MoE load, PKM slot usage) are connected to the data-parallel group.
Pipeline stages are built afterwards by ``pipeline.build_pipeline``.
"""
from __future__ import annotations


def parallelize(model, cfg, topo):
    from sparselm.parallel.expert import apply_expert_parallel, deduplicate_over_tp
    from sparselm.parallel.pkm import share_usage_statistics
    from sparselm.parallel.tensor import apply_tp

    model = apply_tp(model, topo)
    apply_expert_parallel(model, topo.ep, topo.dp_group)
    if cfg.parallel.moe_tp_dedup:
        deduplicate_over_tp(model, topo.tp_group)
    share_usage_statistics(model, topo.dp_group)
    return model
