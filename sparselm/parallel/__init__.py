"""Parallelism applied from outside the model: topology, tensor, expert and pipeline parallelism.

``parallelize(model, cfg, topo)`` is the one call the trainer makes on the one-process model, normally
built on the meta device (``build_model(cfg, device="meta")``), so nothing of it is allocated yet:
1. tensor-parallel layers are swapped in (megatron-core);
2. MoE layers are sharded over the expert-parallel group (DeepSpeed's groups) and, under tensor
   parallelism, their routed experts are sharded by hidden width over the TP group
   (``parallel.moe_tp_mode='weights'``) or their routed rows split over the TP ranks (``'rows'``);
3. layers that keep statistics (MoE load, PKM slot usage) are connected to the data x context-parallel group;
4. under ``parallel.cp`` > 1 each rank runs its piece of the sequences (``context``);
5. the blocks ``parallel.recompute`` names recompute their activations in backward (``recompute``).
Every parameter is then this rank's piece of a canonical tensor (``pieces.placements``), which
``materialize.materialize_pieces`` fills from the seeded init or a checkpoint.  Pipeline stages are built
afterwards by ``pipeline.build_pipeline`` and materialise only their own layers.
"""
from __future__ import annotations


def parallelize(model, cfg, topo):
    from sparselm.parallel.context import apply_context_parallel
    from sparselm.parallel.expert import apply_expert_parallel, apply_expert_tensor_parallel, deduplicate_over_tp
    from sparselm.parallel.pkm import share_usage_statistics
    from sparselm.parallel.recompute import apply_recompute
    from sparselm.parallel.tensor import apply_tp

    model = apply_tp(model, topo)
    apply_expert_parallel(model, topo.ep, topo.dp_cp_group, topo.ep_group)
    if cfg.parallel.moe_tp_mode == "weights":
        apply_expert_tensor_parallel(model, topo.tp_group)
    else:
        deduplicate_over_tp(model, topo.tp_group)
    share_usage_statistics(model, topo.dp_cp_group)
    apply_context_parallel(model, topo)
    return apply_recompute(model, cfg)
