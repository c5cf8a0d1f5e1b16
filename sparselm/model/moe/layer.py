"""The MoE feed-forward slot: route, drop over capacity, dispatch, grouped experts, combine.

``forward(x) -> (y, aux_loss)``; ``self.metrics`` describes the last forward and ``self.step_metrics`` the
last optimizer step.  Routing statistics (capacity, balancing loss) are taken per sequence by default
(``balance_scope='sequence'``), so results depend neither on the micro-batch size nor on the parallel
layout; ``'micro_batch'`` takes them over a rank's micro-batch, as Switch and DeepSpeed do.  Per-forward
metrics are means over equal-sized micro-batches (the trainer averages them into global-batch figures);
the load imbalance, a maximum, is taken once per step from the step's summed counts.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparselm.model.feedforward import SwiGLU
from sparselm.model.moe.activation import GLUClamp
from sparselm.model.moe.config import resolved_expert_hidden, resolved_shared_hidden
from sparselm.model.moe.dispatch import LocalDispatcher, combine_choices, count_ids, expert_capacity, plan_dispatch
from sparselm.model.moe.experts import GroupedExperts
from sparselm.model.moe.router import Router, balance_loss, z_loss
from sparselm.model.recompute import recomputing


class MoELayer(nn.Module):
    def __init__(self, d_model: int, num_experts: int, top_k: int, expert_hidden: int, *, num_shared_experts: int = 0,
                 score_func: str = "softmax", renormalize: bool = True, noisy_gating: bool = False,
                 bias_balancing: bool = False, bias_update_rate: float = 1e-3, aux_loss_coef: float = 1e-2,
                 z_loss_coef: float = 1e-3, drop_tokens: bool = False, capacity_factor: float = 1.25,
                 drop_policy: str = "position", balance_scope: str = "sequence", expert_impl: str = "auto",
                 init_std: float = 0.02, out_std: float = 0.02, seed: int = 0, shared_expert_gate: bool = False,
                 routed_scaling_factor: float = 1.0, n_group: int = 1, topk_group: int = 1, router_bias: bool = False,
                 expert_bias: bool = False, clamp: GLUClamp | None = None, shared_hidden: int = 0,
                 group_score: str = "top2_sum"):
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.aux_loss_coef, self.z_loss_coef = aux_loss_coef, z_loss_coef
        self.capacity_factor = capacity_factor if drop_tokens else None
        self.drop_policy, self.per_sequence = drop_policy, balance_scope == "sequence"
        self.bias_update_rate = bias_update_rate
        self.router = Router(d_model, num_experts, top_k, score_func, renormalize, noisy_gating, bias_balancing, init_std,
                             seed, n_group, topk_group, routed_scaling_factor, router_bias, group_score)
        self.experts = GroupedExperts(num_experts, d_model, expert_hidden, init_std, out_std, expert_impl, expert_bias,
                                      clamp)
        # one SwiGLU of the shared experts' joint width (shared_hidden; 0: num_shared_experts x expert_hidden)
        shared_width = shared_hidden or num_shared_experts * expert_hidden
        self.shared_experts = SwiGLU(d_model, shared_width) if num_shared_experts else None
        # Qwen2-MoE: the shared experts' output times sigmoid(x . w)
        self.shared_expert_gate = nn.Linear(d_model, 1, bias=False) if shared_expert_gate else None
        self.dispatcher = LocalDispatcher()
        # Set by sparselm.parallel: sums a tensor over the data-parallel ranks (the step's load counts).
        self.stats_reducer = None
        # Set by context parallelism (sparselm.parallel.context): this forward sees one of ``sequence_parts``
        # equal pieces of each sequence; ``sequence_reducer`` sums a tensor over the pieces (no gradient).
        self.sequence_reducer, self.sequence_parts = None, 1
        self.register_buffer("load_since_update", torch.zeros(num_experts, dtype=torch.int64), persistent=False)
        self.metrics: dict[str, torch.Tensor] = {}
        self.step_metrics: dict[str, torch.Tensor] = {}

    @classmethod
    def from_config(cls, cfg, layer_idx: int) -> "MoELayer":
        m, mm = cfg.moe, cfg.model
        return cls(mm.d_model, m.num_experts, m.top_k, resolved_expert_hidden(cfg),
                   num_shared_experts=m.num_shared_experts, score_func=m.score_func, renormalize=m.renormalize,
                   noisy_gating=m.noisy_gating, bias_balancing=m.bias_balancing, bias_update_rate=m.bias_update_rate,
                   aux_loss_coef=m.aux_loss_coef, z_loss_coef=m.z_loss_coef, drop_tokens=m.drop_tokens,
                   capacity_factor=m.capacity_factor, drop_policy=m.drop_policy, balance_scope=m.balance_scope,
                   expert_impl=m.expert_impl, init_std=mm.init_std,
                   out_std=mm.init_std / math.sqrt(2 * mm.n_layers), seed=cfg.train.seed,
                   shared_expert_gate=m.shared_expert_gate, routed_scaling_factor=m.routed_scaling_factor,
                   n_group=m.n_group, topk_group=m.topk_group, router_bias=m.router_bias,
                   expert_bias=m.expert_biases, clamp=GLUClamp(m.swiglu_limit, m.swiglu_alpha, m.swiglu_up_offset),
                   shared_hidden=resolved_shared_hidden(cfg), group_score=m.group_score)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, D] (or [N, D]: one group) -> (y like x, aux_loss scalar fp32)."""
        shape, d, k = x.shape, x.shape[-1], self.top_k
        tokens = x.reshape(-1, d)
        n = tokens.shape[0]
        sequences = shape[0] if x.dim() == 3 else 1
        groups = sequences if self.per_sequence else 1  # what capacity and balance statistics are taken over
        routing = self.router.route(tokens)
        capacity = (None if self.capacity_factor is None
                    else expert_capacity(n // groups, k, self.num_experts, self.capacity_factor))
        plan = plan_dispatch(routing.experts, routing.probs, self.num_experts, capacity, sequences,
                             self.per_sequence, self.drop_policy)

        rows = tokens.index_select(0, plan.order // k)
        local_rows, local_counts, context = self.dispatcher.dispatch(rows, plan.counts)
        out = self.dispatcher.combine(self.experts(local_rows, local_counts), context)
        # gates applied and the k choices summed in fp32, per token (dispatch.combine_choices)
        y = combine_choices(out, routing.gates.view(n, k), plan.order).to(x.dtype)
        if self.shared_experts is not None:
            shared = self.shared_experts(tokens)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(tokens)) * shared
            y = y + shared

        group_of = torch.arange(n * k, device=x.device) // max(1, n * k // groups)
        group_counts = count_ids(group_of * self.num_experts + routing.experts.reshape(-1), groups * self.num_experts)
        if self.sequence_reducer is not None:  # f_i of the whole sequences; P_i and z stay this piece's means
            group_counts = self.sequence_reducer(group_counts)
        lb = balance_loss(routing.scores.view(groups, n // groups, -1), group_counts.view(groups, -1))
        z = z_loss(routing.logits)
        # a piece's share: the pieces' aux losses add up to the whole sequences' (their metrics average to it)
        aux = (self.aux_loss_coef * lb + self.z_loss_coef * z) / self.sequence_parts
        if not recomputing():  # a recomputed forward (activation checkpointing) repeats these: count once
            if self.training:
                self.load_since_update += plan.routed
            self._record(plan, lb, z)
        return y.view(shape), aux

    @torch.no_grad()
    def _record(self, plan, lb: torch.Tensor, z: torch.Tensor) -> None:
        total = plan.routed.sum().clamp_min(1)
        self.metrics = {
            "expert_load": plan.routed.float() / total,
            "dropped_frac": 1 - plan.counts.sum().float() / total,
            "balance_loss": lb.detach(),
            "z_loss": z.detach(),
        }

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Hook the trainer calls on every module after each optimizer step: sums the step's assignment counts
        over data-parallel ranks (integers, hence bit-identical on every rank), records ``load_max`` (the
        busiest expert's share x E, 1 at perfect balance) in ``step_metrics`` and, with bias balancing, moves
        the bias (DeepSeek-V3): bias_i += rate * sign(mean load - load_i)."""
        counts = self.load_since_update.clone()
        if self.stats_reducer is not None:
            counts = self.stats_reducer(counts)
        self.load_since_update.zero_()
        if int(counts.sum()) == 0:
            return
        counts = counts.double()
        self.step_metrics = {"load_max": counts.max() / counts.sum() * self.num_experts}
        bias = self.router.expert_bias
        if bias is not None:
            bias += (self.bias_update_rate * torch.sign(counts.mean() - counts)).to(bias.dtype)

    def active_params(self) -> int:
        """Parameters one token uses: router, shared experts and top_k routed experts."""
        n = sum(p.numel() for p in self.router.parameters())
        if self.shared_experts is not None:
            n += sum(p.numel() for p in self.shared_experts.parameters())
        if self.shared_expert_gate is not None:
            n += self.shared_expert_gate.weight.numel()
        return n + self.top_k * self.experts.params_per_expert()
