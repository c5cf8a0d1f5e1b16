"""Every private DeepSpeed name sparselm relies on, in one place: what to check when DeepSpeed is upgraded.

DeepSpeed has no public API for these; each function says what it reaches into and why.  Besides them,
two subclasses override private methods by name and are listed here for the same reason:
- ``sparselm.parallel.pipeline.SparseLMPipe`` (a ``PipelineModule``): ``_partition_layers`` (refuse a stage
  without layers), ``_count_layer_params`` and ``_get_frozen_parameter_names`` (count the meta modules, build
  nothing), and reads ``_layer_specs``, ``_local_start``, ``_local_stop`` and ``parts``; ``stage_bounds`` runs
  ``_partition_layers`` on an instance whose ``__init__`` is skipped, setting ``_layer_specs``, ``_topo``,
  ``num_stages``, ``global_rank`` and ``loss_fn`` (what it reads) itself;
- ``pipeline_backward_in_one_call`` replaces ``PipelineEngine._exec_backward_pass`` in an engine's
  ``_INSTRUCTION_MAP`` by a wrapper around it;
- ``sparselm.parallel.expert.DeepSpeedMoETag`` (a ``deepspeed.moe.layer.MoE``): skips its ``__init__`` and
  sets the attributes ``deepspeed.initialize`` reads (``num_experts``, ``ep_size``, ``expert_group_name``,
  ``num_local_experts``, ``enable_expert_tensor_parallelism``).
Tested against the DeepSpeed version in ``setup.py``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


# ------------------------------------------------------------------ expert groups (deepspeed.utils.groups)
def expert_groups_exist(name: str) -> bool:
    from deepspeed.utils import groups

    return name in groups._get_expert_parallel_group_dict()


def create_expert_groups(ep_size: int, mpu=None) -> None:
    """DeepSpeed's expert-parallel and expert-data-parallel groups ``ep_size_<ep>``: with ``mpu``, laid out
    inside its data-parallel lanes (``_create_expert_data_and_model_parallel``, which reads the global
    ``groups.mpu``: set for the call and restored, as is the expert-tensor-parallel size it may change);
    without, over the whole world (``_create_expert_and_data_parallel``)."""
    from deepspeed.utils import groups

    if mpu is None:
        groups._create_expert_and_data_parallel(ep_size)
        return
    saved = groups.mpu, groups.expert_tensor_parallel_world_size
    groups.mpu = mpu
    try:
        groups._create_expert_data_and_model_parallel(ep_size, mpu=mpu)
    finally:
        groups.mpu, groups.expert_tensor_parallel_world_size = saved


def expert_parallel_group(name: str):
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(name: str):
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(name)


def expert_group_ranks(name: str) -> tuple[list[int], list[int]]:
    """(expert-parallel ranks, expert-data-parallel ranks) of this rank's groups ``name``."""
    from deepspeed.utils import groups

    return (list(groups._get_expert_parallel_group_ranks(name)),
            list(groups._get_expert_data_parallel_group_ranks(name)))


def forget_mpu(mpu) -> None:
    """Drop DeepSpeed's global reference to ``mpu`` (``groups.mpu``) when it is ours, at teardown."""
    from deepspeed.utils import groups

    if groups.mpu is mpu:
        groups.mpu = None


# ------------------------------------------------------------------ engine and ZeRO optimizer
def zero_flat_fp32_partitions(optimizer) -> list[torch.Tensor]:
    """ZeRO-3's flat fp32 partitions (``fp32_partitioned_groups_flat``): its base optimizer keys state by
    them, and they sit outside ``param_groups`` between steps.  Empty for other stages."""
    return list(getattr(optimizer, "fp32_partitioned_groups_flat", []))


def relink_zero_optimizer_state(optimizer) -> None:
    """ZeRO 1/2 link each parameter's optimizer-state fragments lazily after the first parameter group's step
    (``_hp_optimizer_states_linked``, ``_lazy_init_hp_params_optimizer_state``), leaving later groups
    unlinked; redo the link for all groups so ``safe_get/set_full_optimizer_state`` reach every parameter."""
    if hasattr(optimizer, "_hp_optimizer_states_linked") and hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):
        optimizer._hp_optimizer_states_linked = False
        optimizer._lazy_init_hp_params_optimizer_state()


def zero_fragment(p, keys) -> tuple[int, int, torch.Tensor, dict[str, torch.Tensor]]:
    """ZeRO 1/2 (and the bf16 optimizer): (first element, element count, fp32 master view, {state key: view}) of
    the part of ``p`` this rank's flat partition owns (``p._hp_mapping``, a ``tensor_fragment``: the public
    ``safe_get_full_*`` calls all-reduce the whole tensor instead)."""
    mapping = p._hp_mapping
    address = mapping.lp_fragment_address
    states = mapping.optim_fragment or {}
    return address.start, address.numel, mapping.hp_fragment.view(-1), {k: states[k].view(-1) for k in keys if k in states}


def zero3_partition(p) -> tuple[int, int]:
    """ZeRO-3: (first element, element count) of ``p`` in this rank's partition (``ds_tensor``, padded to equal
    sizes over its partition group, ``_get_param_partition_rank``; the padding is not part of the tensor)."""
    size = p.ds_tensor.ds_numel
    start = p._z3_optimizer._get_param_partition_rank(p) * size
    return start, max(0, min(size, p.ds_numel - start))


def replace_fp32_clipping(engine, clip) -> None:
    """Without ZeRO, the engine clips fp32 gradients in ``clip_fp32_gradients`` (averaging per-rank norms)
    and keeps no norm; ``clip()`` replaces it and must return the global norm, stored where
    ``engine.get_global_grad_norm()`` reads it (``_global_grad_norm``)."""

    def clip_and_record():
        engine._global_grad_norm = clip()

    engine.clip_fp32_gradients = clip_and_record


# ------------------------------------------------------------------ ZeRO-3 conversion (partition_parameters.Init)
def zero3_converter(ds_config: dict, dp_group, mpu=None, dtype=None):
    """A function partitioning parameters the way ``deepspeed.initialize`` does under ZeRO stage 3: one
    ``deepspeed.zero.Init`` built with the engine's arguments (data-parallel group, config, offload device from
    it, ``mpu``, ``dtype``) but never entered (no patched constructors), whose private
    ``_convert_to_zero_parameters`` (what ``Init(module=...)`` and the engine's ``DeepSpeedZeRoOffload`` call)
    takes a list of whole parameters and leaves each DeepSpeed's partitioned parameter: its ``ds_tensor`` this
    rank's partition (on the offload device if any), its data freed.  A parameter carrying
    ``ds_zero_partition_process_group`` is partitioned over that group (AutoEP experts)."""
    from deepspeed.runtime.zero.partition_parameters import Init

    init = Init(data_parallel_group=dp_group, config_dict_or_path=ds_config, mpu=mpu, dtype=dtype)
    return init._convert_to_zero_parameters


# ------------------------------------------------------------------ pipeline engine (deepspeed.runtime.pipe)
def pipeline_backward_in_one_call(engine) -> None:
    """DeepSpeed's ``PipelineEngine._exec_backward_pass`` back-propagates a stage's float outputs (our hidden
    states and aux loss) with one ``Tensor.backward`` call each, ``retain_graph=True`` for all but the last: the
    stage's graph is traversed once per output, a recomputed block (``parallel.recompute``) recomputed once per
    output, which selective recomputation refuses ("backward an extra time").  This engine's backward passes
    run those calls as one ``torch.autograd.backward`` (the same gradients, summed by autograd)."""
    from deepspeed.runtime.pipe.engine import PipelineEngine
    from deepspeed.runtime.pipe.schedule import BackwardPass

    original = PipelineEngine._INSTRUCTION_MAP[BackwardPass]

    def backward_pass(self, buffer_id):
        with _joined_backward_calls():
            original(self, buffer_id)

    engine._INSTRUCTION_MAP = {**engine._INSTRUCTION_MAP, BackwardPass: backward_pass}


@contextmanager
def _joined_backward_calls():
    """Inside: ``Tensor.backward(gradient, retain_graph=True)`` is deferred, and the next call without
    retain_graph runs every deferred one with it in one ``torch.autograd.backward``."""
    plain, pending = torch.Tensor.backward, []

    def backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
        if retain_graph and not create_graph and inputs is None:
            pending.append((self, gradient))
            return
        tensors, grads = [t for t, _ in pending] + [self], [g for _, g in pending] + [gradient]
        pending.clear()
        torch.autograd.backward(tensors, grads, retain_graph=retain_graph, create_graph=create_graph, inputs=inputs)

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = plain
        if pending:
            raise RuntimeError("a deferred pipeline backward call was never run (DeepSpeed's backward loop changed?)")
