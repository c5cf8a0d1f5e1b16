"""Parallelism applied from outside the model: topology, tensor, expert and pipeline parallelism.

``parallelize(model, cfg, topo)`` is the one call the trainer makes on a built model: tensor-parallel
layers are swapped in (megatron-core), then MoE layers are sharded over the expert-parallel group
(DeepSpeed's groups), and layers that keep statistics (MoE load, PKM slot usage) are connected to
the data-parallel group.  Pipeline stages are built afterwards by ``pipeline.build_pipeline``.
"""
from __future__ import annotations


def parallelize(model, cfg, topo):
    if topo.tp > 1:
        from sparselm.parallel.tensor import apply_tp

        model = apply_tp(model, topo)
    from sparselm.parallel.expert import apply_expert_parallel

    from sparselm.parallel.pkm import share_usage_statistics

    apply_expert_parallel(model, topo.ep, topo.dp_group)
    share_usage_statistics(model, topo.dp_group)
    return model
