"""Token-choice top-k router, computed in fp32 whatever the model dtype.

``Router`` (the module) returns plain fp32 logits, so hooks that wrap module calls (ZeRO-3 gathering its
weight for forward and backward) see its output; ``route`` turns logits into the top-k ``Routing`` outside
the module.  Selection may use biased scores (auxiliary-loss-free balancing) while the gate weights and the
losses always use the unbiased scores.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparselm.model.moe.noise import keyed_normal


@dataclass
class Routing:
    experts: torch.Tensor
    """[N, k] chosen expert per token and choice (int64)."""
    gates: torch.Tensor
    """[N, k] fp32 weights applied to the expert outputs (renormalised if asked)."""
    probs: torch.Tensor
    """[N, k] fp32 unbiased scores of the chosen experts before renormalisation (drop priority)."""
    scores: torch.Tensor
    """[N, E] fp32 unbiased router scores."""
    logits: torch.Tensor
    """[N, E] fp32 logits the scores were computed from."""


def route(logits: torch.Tensor, k: int, score_func: str = "softmax", renormalize: bool = True,
          bias: torch.Tensor | None = None, n_group: int = 1, topk_group: int = 1, scale: float = 1.0,
          group_score: str = "top2_sum") -> Routing:
    """Scores from fp32 logits, top-k selection (on scores + bias), gate weights from the unbiased scores
    (renormalised if asked, then times ``scale``, the routed scaling factor).  ``n_group`` > 1: selection only
    among the ``topk_group`` groups of experts scoring highest by ``group_score`` (``limit_to_groups``)."""
    logits = logits.float()
    scores = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    select = scores if bias is None else scores.detach() + bias
    if n_group > 1:
        select = limit_to_groups(select, n_group, topk_group, group_score)
    experts = torch.topk(select, k, dim=-1).indices
    probs = scores.gather(1, experts)
    gates = probs / probs.sum(-1, keepdim=True).clamp_min(torch.finfo(probs.dtype).tiny) if renormalize else probs
    if scale != 1.0:
        gates = gates * scale
    return Routing(experts=experts, gates=gates, probs=probs, scores=scores, logits=logits)


def limit_to_groups(select: torch.Tensor, n_group: int, topk_group: int,
                    group_score: str = "top2_sum") -> torch.Tensor:
    """select [N, E] with the experts outside each token's ``topk_group`` best groups set to -inf; a group's
    score is the sum of its two best selection scores (``top2_sum``: DeepSeek-V3, transformers'
    Glm4MoeTopkRouter) or its best one (``max``: DeepSeek-V2's group_limited_greedy)."""
    n, e = select.shape
    grouped = select.detach().view(n, n_group, e // n_group)
    group_scores = grouped.amax(-1) if group_score == "max" else grouped.topk(2, dim=-1).values.sum(-1)
    keep = torch.zeros_like(group_scores, dtype=torch.bool)
    keep.scatter_(1, torch.topk(group_scores, topk_group, dim=-1, sorted=False).indices, True)
    keep = keep.unsqueeze(-1).expand(n, n_group, e // n_group).reshape(n, e)
    return select.masked_fill(~keep, float("-inf"))


def balance_loss(scores: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss E * sum_i f_i P_i; 1 at perfect balance.

    scores: [T, E] router scores of one group of tokens, or [G, T, E] for G groups (sequences);
    counts: [E] or [G, E] assignments per expert in each group.  f_i: fraction of the group's T*k assignments
    routed to expert i (not differentiable); P_i: mean over the group's tokens of the router probability of
    expert i (sigmoid scores are normalised per token first).  With groups, the loss is the mean over groups:
    DeepSeek-V3's sequence-wise balance loss, Megatron's seq_aux_loss."""
    num_experts = scores.shape[-1]
    if scores.shape[-2] == 0:
        return scores.sum()
    probs = scores / scores.sum(-1, keepdim=True)
    f = counts.to(scores.dtype) / counts.sum(-1, keepdim=True).clamp_min(1)
    return num_experts * (f * probs.mean(-2)).sum(-1).mean()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
    if logits.shape[0] == 0:
        return logits.sum()
    return torch.logsumexp(logits, dim=-1).square().mean()


class Router(nn.Module):
    """Linear router (with ``bias``: a learned per-expert bias on the logits, so it moves both the choice and
    the weights, as gpt-oss's router), optional noise projection, optional selection bias buffer.

    Noisy gating (Shazeer 2017) draws its noise from ``keyed_normal`` keyed by (``seed``, optimizer step,
    global token position), so it does not depend on the layout.  The trainer calls ``start_step(step,
    token_offset)`` before each step's first micro-batch (token_offset: the global position of this rank's
    first token); each training forward then takes the next ``N`` positions.  Without that call the
    positions simply count training tokens from 0."""

    def __init__(self, d_model: int, num_experts: int, top_k: int, score_func: str = "softmax",
                 renormalize: bool = True, noisy: bool = False, bias_balancing: bool = False, init_std: float = 0.02,
                 seed: int = 0, n_group: int = 1, topk_group: int = 1, scale: float = 1.0, bias: bool = False,
                 group_score: str = "top2_sum"):
        super().__init__()
        self.group_score = group_score
        self.n_group, self.topk_group, self.scale = n_group, topk_group, scale
        self.seed, self.noise_step, self.next_position = seed, 0, 0
        self.num_experts, self.top_k = num_experts, top_k
        self.score_func, self.renormalize, self.init_std = score_func, renormalize, init_std
        self.weight = nn.Parameter(torch.empty(num_experts, d_model))
        self.bias = nn.Parameter(torch.empty(num_experts)) if bias else None
        self.noise_weight = nn.Parameter(torch.empty(num_experts, d_model)) if noisy else None
        # Selection bias (float32, never cast): part of the model state, updated outside the optimizer.
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32) if bias_balancing else None)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, 0.0, self.init_std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if self.noise_weight is not None:
            nn.init.zeros_(self.noise_weight)  # Shazeer 2017: the noise scale starts at softplus(0)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def start_step(self, step: int, token_offset: int) -> None:
        """Key the coming training forwards' noise: ``step`` optimizer steps done, this rank's first token at
        global position ``token_offset`` of the step's global batch."""
        self.noise_step, self.next_position = step, token_offset

    def forward_state(self) -> int:
        """The next token position (``hooks.ForwardState``): a recomputed forward draws the same noise."""
        return self.next_position

    def set_forward_state(self, state: int) -> None:
        self.next_position = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [N, D] tokens -> fp32 logits [N, E] (with gating noise in training when noisy)."""
        x32 = x.float()
        logits = F.linear(x32, self.weight.float(), None if self.bias is None else self.bias.float())
        if self.noise_weight is not None and self.training:
            noise_std = F.softplus(F.linear(x32, self.noise_weight.float()))
            positions = torch.arange(self.next_position, self.next_position + x.shape[0], device=x.device)
            self.next_position += x.shape[0]
            noise = keyed_normal(self.seed, self.noise_step, positions, self.num_experts)
            logits = logits + noise * noise_std
        return logits

    def route(self, x: torch.Tensor) -> Routing:
        """x: [N, D] tokens -> Routing (``forward`` then ``route``; call it where no ZeRO hook is needed)."""
        return route(self(x), self.top_k, self.score_func, self.renormalize, self.expert_bias, self.n_group,
                     self.topk_group, self.scale, self.group_score)
