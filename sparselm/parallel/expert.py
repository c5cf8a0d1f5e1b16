"""Expert parallelism for ``sparselm.model.moe`` layers on DeepSpeed's expert process groups.

``apply_expert_parallel(model, ep_size, dp_group)``, called by ``sparselm.parallel.parallelize`` before
``deepspeed.initialize``:
- uses DeepSpeed's groups ``ep_size_<ep>`` (created by ``Topology``, or here if missing), so the engine
  knows them;
- keeps on each rank only its ``num_experts / ep`` experts and routes tokens to them with
  ``all_to_all_single`` (variable splits: dropless needs no padding to a common capacity);
- marks expert parameters as DeepSpeed's own MoE does (``allreduce = False``, ``group_name``) so the engine
  averages their gradients over the expert-data-parallel group (divided by the full data-parallel size, so
  the gradient equals the one-process gradient), and tags each layer so ``engine.has_moe_layers`` is set;
- sums the load counts of bias balancing over all data-parallel ranks, so the bias stays identical.

The optimizer must receive expert parameters in their own groups (``split_expert_param_groups``), and without
ZeRO the gradient norm must be taken with ``clip_grad_norm_`` from here: DeepSpeed's stage-0 clipping
averages per-rank norms instead of summing squares over the expert shards.  Expert shards carry the
placement ``Shard(0, "ep")`` (sparselm.parallel.pieces), so checkpoints stay layout-free.

Under tensor parallelism (``parallel.moe_tp_mode``) routed experts are either sharded by their hidden
width over the TP group (``weights``, the default: ``apply_expert_tensor_parallel``, as Megatron's
expert tensor parallelism) or kept whole with the routed rows split over the TP ranks (``rows``:
``deduplicate_over_tp``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE as _DeepSpeedMoE
from deepspeed.moe.utils import is_moe_param, split_params_into_different_moe_groups_for_optimizer
from torch import nn

from sparselm.model.moe import MoELayer
from sparselm.model.moe.experts import GroupedExperts
from sparselm.parallel.comm import GroupReducer
from sparselm.parallel.pieces import Shard, group_rank_size, in_world, is_sharded_over, shard_
from sparselm.parallel.topology import ensure_deepspeed_comm


def group_name(ep_size: int) -> str:
    """DeepSpeed's name for the expert groups of one expert-parallel degree."""
    return f"ep_size_{ep_size}"


# ---------------------------------------------------------------------------------------------
# communication
class _AllToAll(torch.autograd.Function):
    """all_to_all_single with variable splits; the backward sends gradients the opposite way."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty((sum(in_splits), *grad.shape[1:]))
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    return _AllToAll.apply(x, out_splits, in_splits, group)


def _block_transpose(counts: torch.Tensor) -> torch.Tensor:
    """Rows laid out as blocks (a, b) in row-major order with sizes counts[a, b] -> the permutation that
    lists them as blocks (b, a)."""
    sizes = counts.reshape(-1)
    src_start = torch.cumsum(sizes, 0) - sizes
    blocks = torch.arange(sizes.numel(), device=sizes.device).view(counts.shape).t().reshape(-1)
    lengths = sizes[blocks]
    total = int(lengths.sum())
    shift = src_start[blocks] - (torch.cumsum(lengths, 0) - lengths)
    return torch.arange(total, device=sizes.device) + torch.repeat_interleave(shift, lengths, output_size=total)


class AllToAllDispatcher:
    """Sends rows grouped by global expert to the rank holding the expert, and the outputs back.

    Rank r of the expert-parallel group holds experts [r * L, (r + 1) * L).  After the exchange, rows are
    ordered by (source rank, local expert); they are permuted to (local expert, source rank) for the
    grouped matmul and back before the return trip."""

    def __init__(self, group, ep_size: int, num_local_experts: int):
        self.group, self.ep_size, self.num_local = group, ep_size, num_local_experts

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor):
        send = counts.reshape(self.ep_size, self.num_local)
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts.contiguous(), group=self.group)
        recv = recv.view(self.ep_size, self.num_local)  # [source rank, local expert]
        in_splits, out_splits = send.sum(1).tolist(), recv.sum(1).tolist()
        received = all_to_all(rows, out_splits, in_splits, self.group)
        perm = _block_transpose(recv)
        return received.index_select(0, perm), recv.sum(0), (perm, in_splits, out_splits)

    def combine(self, rows: torch.Tensor, context) -> torch.Tensor:
        perm, in_splits, out_splits = context
        back = torch.empty_like(rows).index_copy(0, perm, rows)
        return all_to_all(back, in_splits, out_splits, self.group)


class DeepSpeedMoETag(_DeepSpeedMoE):
    """No parameters, no forward: an instance of DeepSpeed's MoE class inside the model makes
    ``deepspeed.initialize`` treat the model as MoE (expert gradient reduction, MoE optimizer groups,
    expert-aware ZeRO partitioning and norm).  DeepSpeed's MoE.__init__ is skipped on purpose: it would
    build DeepSpeed's own gate and experts."""

    def __init__(self, num_experts: int, ep_size: int):
        nn.Module.__init__(self)
        self.num_experts, self.ep_size = num_experts, ep_size
        self.num_local_experts = num_experts // ep_size
        self.expert_group_name = group_name(ep_size)
        self.enable_expert_tensor_parallelism = False

    def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
        """The engine calls this; the groups exist already (Topology or apply_expert_parallel created them)."""

    def forward(self, *args, **kwargs):
        raise RuntimeError("DeepSpeedMoETag is a marker for deepspeed.initialize and has no forward")


def _autoep_tag_class():
    """``AutoEPTag``: the marker ZeRO-3 accepts (DeepSpeed 0.19 refuses its native MoE class under ZeRO-3,
    ``DeepSpeedEngine._validate_zero3_moe_compatibility``, but partitions the experts of its AutoEP layers
    over their expert-data-parallel group).  Built on first use: DeepSpeed's AutoEP module is only needed then."""
    global _AUTOEP_TAG
    if _AUTOEP_TAG is None:
        from deepspeed.module_inject.auto_ep_layer import AutoEPMoELayer

        class AutoEPTag(AutoEPMoELayer):
            """No parameters, no forward; an ``AutoEPMoELayer`` so ``deepspeed.initialize`` under ZeRO-3 sets
            ``has_moe_layers`` and takes its AutoEP path.  AutoEPMoELayer.__init__ is skipped on purpose (it
            would build DeepSpeed's router and experts from a Hugging Face block)."""

            def __init__(self, num_experts: int, ep_size: int):
                nn.Module.__init__(self)
                self.num_experts, self.ep_size = num_experts, ep_size
                self.num_local_experts = num_experts // ep_size
                self.ep_group_name = group_name(ep_size)

            def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False,
                                          folding_group_handles=None) -> None:
                """The engine calls this; the groups exist already (Topology or apply_expert_parallel)."""

            def forward(self, *args, **kwargs):
                raise RuntimeError("AutoEPTag is a marker for deepspeed.initialize and has no forward")

        _AUTOEP_TAG = AutoEPTag
    return _AUTOEP_TAG


_AUTOEP_TAG = None


def tag_experts_for_zero3(model: nn.Module) -> int:
    """Prepare an expert-parallel model for ZeRO stage 3 (call before ``deepspeed.initialize``): every MoE
    layer's marker becomes an ``AutoEPTag`` and its expert parameters carry DeepSpeed's AutoEP placement
    (``ds_zero_placement_family="autoep_expert"`` and the ``ep_size_<ep>`` group name), so the engine
    partitions them over their expert-data-parallel group, averages their gradients over the whole
    data-parallel size and sums their norm over the expert-parallel group (``runtime/zero/stage3.py``,
    ``_autoep_expert_parallel_group``).  Returns the number of layers changed (0 without expert parallelism)."""
    changed = 0
    for layer in moe_layers(model):
        tag = getattr(layer, "deepspeed_tag", None)
        if not isinstance(tag, DeepSpeedMoETag):
            continue
        layer.deepspeed_tag = _autoep_tag_class()(tag.num_experts, tag.ep_size)
        for p in layer.experts.parameters():
            p.ds_zero_placement_family = "autoep_expert"
            p.ds_zero_partition_group_name = tag.expert_group_name
        changed += 1
    return changed


# ---------------------------------------------------------------------------------------------
# applying
def moe_layers(model: nn.Module) -> list[MoELayer]:
    return [m for m in model.modules() if isinstance(m, MoELayer)]


def expert_groups(ep_size: int):
    """(expert-parallel group, expert-data-parallel group) of this rank, created once through DeepSpeed."""
    from sparselm.parallel import deepspeed_private as dsp

    ensure_deepspeed_comm()
    name = group_name(ep_size)
    if not dsp.expert_groups_exist(name):
        dsp.create_expert_groups(ep_size)
    return dsp.expert_parallel_group(name), dsp.expert_data_parallel_group(name)


def apply_expert_parallel(model: nn.Module, ep_size: int, dp_group=None, ep_group=None) -> nn.Module:
    """Shard every MoE layer of ``model`` over ``ep_size`` ranks and connect it to the data-parallel group.

    Works on the meta device (each rank's experts are then described, not allocated) or on a real model
    (every rank must hold the same full model: its experts are cut out of it).  ``ep_group``: this rank's expert-parallel group (None: DeepSpeed's
    ``ep_size_<ep>`` group, created if missing).  ``dp_group``: the data-parallel group the load statistics of
    bias balancing are summed over (None: the whole world).  Returns the model, changed in place."""
    layers = moe_layers(model)
    if not layers or not in_world(dp_group):
        return model
    if group_rank_size(dp_group)[1] > 1:
        reducer = GroupReducer(dp_group)
        for layer in layers:
            layer.stats_reducer = reducer
    if ep_size == 1:
        return model
    if ep_group is None:
        ep_group, _ = expert_groups(ep_size)
    ep_rank, size = group_rank_size(ep_group)
    assert size == ep_size, "ep_group does not have ep_size ranks"
    for layer in layers:
        experts = layer.experts
        if experts.num_experts % ep_size:
            raise ValueError(f"{experts.num_experts} experts cannot be split over expert-parallel degree {ep_size}")
        local = experts.num_experts // ep_size
        experts.first_expert = ep_rank * local
        for p in experts.parameters():
            shard_(p, Shard(0, "ep"), {"ep": ep_group})  # experts [r * local, (r + 1) * local)
            p.allreduce = False
            p.group_name = group_name(ep_size)
        layer.dispatcher = AllToAllDispatcher(ep_group, ep_size, local)
        layer.deepspeed_tag = DeepSpeedMoETag(experts.num_experts, ep_size)
    return model


# ---------------------------------------------------------------------------------------------
# optimizer, gradient norm
def split_expert_param_groups(param_groups: list[dict]) -> list[dict]:
    """Move expert parameters into their own groups (``moe: True``, name = DeepSpeed group name), keeping
    each group's other settings; what DeepSpeed's ZeRO and MoE optimizer paths require.  A no-op when
    the model has no expert-parallel parameters."""
    if not any(is_moe_param(p) for g in param_groups for p in g["params"]):
        return param_groups
    groups = split_params_into_different_moe_groups_for_optimizer([dict(g) for g in param_groups])
    return [g for g in groups if g["params"]]


def global_grad_norm(parameters, ep_group=None, mpu=None) -> torch.Tensor:
    """L2 norm of the full-model gradient after data-parallel reduction: every parameter counted once.

    Expert shards: squares summed over the expert-parallel group.  With a model-parallel ``mpu``
    (DeepSpeed's interface, e.g. tensor parallelism): tensor-parallel shards (experts under expert tensor
    parallelism included) are summed over the model-parallel group, parameters replicated across it are
    counted on model-parallel rank 0 only.
    When ``mpu`` has pipeline stages, the stages' sums are added over its pipeline group (tied copies
    marked ``ds_pipe_replicated`` are skipped: counted on their first stage)."""
    from deepspeed.runtime.utils import is_model_parallel_parameter
    from deepspeed.utils.bwc import bwc_tensor_model_parallel_rank

    mp_rank0 = mpu is None or bwc_tensor_model_parallel_rank(mpu) == 0
    shared = torch.zeros((), dtype=torch.float64)
    expert = torch.zeros(2, dtype=torch.float64)  # [TP-sharded experts, experts replicated over TP]
    groups_seen = set()
    for p in parameters:
        if p.grad is None or getattr(p, "ds_pipe_replicated", False):  # a tied copy, counted on its first stage
            continue
        sq = p.grad.detach().double().square().sum().cpu()
        if is_moe_param(p):
            expert[0 if is_model_parallel_parameter(p) else 1] += sq
            groups_seen.add(p.group_name)
        elif mp_rank0 or is_model_parallel_parameter(p):
            shared += sq
    if groups_seen:
        assert len(groups_seen) == 1, f"one expert-parallel degree per model, got {sorted(groups_seen)}"
        if ep_group is None:
            from sparselm.parallel.deepspeed_private import expert_parallel_group

            ep_group = expert_parallel_group(groups_seen.pop())
        dist.all_reduce(expert, group=ep_group)  # every rank of an expert group has the same model-parallel rank
    total = shared + expert[0] + (expert[1] if mp_rank0 else 0)
    if mpu is not None:
        dist.all_reduce(total, group=mpu.get_model_parallel_group())
        if getattr(mpu, "get_pipeline_model_parallel_world_size", lambda: 1)() > 1:
            dist.all_reduce(total, group=mpu.get_pipeline_model_parallel_group())  # each stage holds its own layers
    return total.sqrt().float()


def clip_grad_norm_(parameters, max_norm: float, ep_group=None, mpu=None) -> torch.Tensor:
    """Clip gradients to ``max_norm`` by the global norm of ``global_grad_norm``; returns that norm.
    Every rank computes the same norm, so every replica of a parameter is scaled alike."""
    parameters = [p for p in parameters if p.grad is not None]
    norm = global_grad_norm(parameters, ep_group, mpu)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in parameters:
            p.grad.detach().mul_(coef.to(p.grad.device, p.grad.dtype))
    return norm


# ---------------------------------------------------------------------------------------------
# token de-duplication across tensor parallelism
class TensorParallelDedupDispatcher:
    """Routed experts are replicated over the tensor-parallel group and every TP rank holds the same tokens,
    so without this each rank would compute every routed row.  Here rank r of the TP group takes the r-th
    contiguous chunk of the expert-grouped rows (per-expert counts cut accordingly), sends it through the
    inner dispatcher (local or all-to-all over the expert-parallel group, whose ranks share r), and the
    chunks' outputs are summed back together over the TP group.

    Autograd: the rows enter through megatron's copy-to-TP-region (backward all-reduce: each rank's
    gradient covers its chunk only), the outputs leave through reduce-from-TP-region (the zero-padded
    chunks summed).  Expert weight gradients are partial too; ``RowSplitExperts`` sums them over the group."""

    def __init__(self, inner, tp_group):
        self.inner, self.tp_group = inner, tp_group
        self.tp_rank, self.tp_size = group_rank_size(tp_group)

    def dispatch(self, rows: torch.Tensor, counts: torch.Tensor):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        m = rows.shape[0]
        lo, hi = m * self.tp_rank // self.tp_size, m * (self.tp_rank + 1) // self.tp_size
        ends = torch.cumsum(counts, 0)
        mine = (ends.clamp(lo, hi) - (ends - counts).clamp(lo, hi))  # each expert's rows inside [lo, hi)
        rows = copy_to_tensor_model_parallel_region(rows, self.tp_group)[lo:hi]
        local_rows, local_counts, context = self.inner.dispatch(rows, mine)
        return local_rows, local_counts, (context, lo, hi, m)

    def combine(self, rows: torch.Tensor, context) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region

        inner_context, lo, hi, m = context
        out = self.inner.combine(rows, inner_context)
        padded = torch.cat([out.new_zeros(lo, out.shape[1]), out, out.new_zeros(m - hi, out.shape[1])])
        return reduce_from_tensor_model_parallel_region(padded, self.tp_group)


class RowSplitExperts(GroupedExperts):
    """Whole experts used by a TP rank for its chunk of the routed rows (``TensorParallelDedupDispatcher``):
    the weights enter through copy-to-TP-region, so their gradients (each rank's covers its chunk of rows)
    are summed over the group in backward.  In the graph rather than a hook, so it survives
    materialisation (a hook would stay on the meta Parameter)."""

    tp_group = None

    def wrap_weights(self, *weights):
        from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

        return tuple(None if w is None else copy_to_tensor_model_parallel_region(w, self.tp_group) for w in weights)


def deduplicate_over_tp(model: nn.Module, tp_group) -> nn.Module:
    """Split every MoE layer's routed rows over ``tp_group`` (see TensorParallelDedupDispatcher); call after
    ``apply_expert_parallel``.  A no-op for a group of one rank."""
    if not in_world(tp_group) or group_rank_size(tp_group)[1] == 1:
        return model
    for layer in moe_layers(model):
        layer.dispatcher = TensorParallelDedupDispatcher(layer.dispatcher, tp_group)
        layer.experts.__class__ = RowSplitExperts
        layer.experts.tp_group = tp_group
    return model


# ---------------------------------------------------------------------------------------------
# expert tensor parallelism
class TensorParallelExperts(GroupedExperts):
    """GroupedExperts holding 1/tp of every local expert's hidden width: ``gate_up_proj`` [E, 2H/tp, D] (this
    rank's gate rows then its up rows), ``down_proj`` [E, D, H/tp].  Every TP rank receives the same rows
    (activations are replicated over TP), computes its slice of the hidden units, and the partial outputs
    are summed over the group, as a column- then row-parallel MLP (Megatron's expert tensor parallelism).
    The rows enter through copy-to-TP-region (backward all-reduce: each rank's input gradient covers its
    hidden slice only); weight gradients are complete for each rank's slice.  Biases: ``gate_up_proj_bias``
    is cut with the gate/up rows; ``down_proj_bias`` is whole on every rank and added by TP rank 0 only (so
    the sum over the group adds it once), entering through copy-to-TP-region so every rank gets its gradient."""

    tp_group = None

    def wrap_weights(self, gate_up, down, gate_up_bias=None, down_bias=None):
        if down_bias is not None:
            from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

            first = group_rank_size(self.tp_group)[0] == 0
            down_bias = copy_to_tensor_model_parallel_region(down_bias, self.tp_group) * (1.0 if first else 0.0)
        return gate_up, down, gate_up_bias, down_bias

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel.mappings import (
            copy_to_tensor_model_parallel_region,
            reduce_from_tensor_model_parallel_region,
        )

        out = super().forward(copy_to_tensor_model_parallel_region(x, self.tp_group), counts)
        return reduce_from_tensor_model_parallel_region(out, self.tp_group)


def apply_expert_tensor_parallel(model: nn.Module, tp_group) -> nn.Module:
    """Shard every MoE layer's routed experts by hidden width over ``tp_group`` (in place, meta or real); call
    after ``apply_expert_parallel``.  A no-op for a group of one rank.  Raises ConfigError when the expert
    hidden width is not divisible by the group size."""
    if not in_world(tp_group) or group_rank_size(tp_group)[1] == 1:
        return model
    groups = {"tp": tp_group}
    for layer in moe_layers(model):
        experts = layer.experts
        if not is_sharded_over(experts.gate_up_proj, "tp"):
            shard_(experts.gate_up_proj, Shard(1, "tp", blocks=2), groups)  # [gate_r | up_r]
            shard_(experts.down_proj, Shard(2, "tp"), groups)
            if experts.gate_up_proj_bias is not None:
                shard_(experts.gate_up_proj_bias, Shard(1, "tp", blocks=2), groups)
        experts.__class__ = TensorParallelExperts
        experts.tp_group = tp_group
    return model
