"""The ``moe`` config section and its start-up checks."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from sparselm.errors import require


@dataclass
class MoEConfig:
    """Mixture-of-experts layers (block kind `moe`): router, experts, capacity, balancing losses."""

    num_experts: int = 8
    """Routed experts per MoE layer (all layers of kind 'moe' share these settings)."""
    top_k: int = 2
    """Experts each token is sent to: 1 as in Switch, 2 as in GShard/Mixtral."""
    expert_hidden: int = 0
    """Hidden width of one SwiGLU expert; 0 means model.ffn_hidden // (top_k + num_shared_experts), so a token's
    active feed-forward parameters equal those of the dense block."""
    num_shared_experts: int = 0
    """Experts that see every token (DeepSeek-MoE); their output is added to the routed experts' output."""
    shared_expert_hidden: int = 0
    """Joint hidden width of the shared experts (they are one SwiGLU of this width); 0 means
    num_shared_experts x the routed experts' width.  Any width is allowed (Qwen2-MoE's
    shared_expert_intermediate_size, GraniteMoE-Shared's shared_intermediate_size); needs num_shared_experts >= 1."""
    shared_expert_gate: bool = False
    """Scale the shared experts' output by sigmoid(x . w), w a learned [1, d_model] vector (Qwen2-MoE)."""
    router_bias: bool = False
    """A learned per-expert bias on the router logits, used both to choose the experts and in their weights
    (gpt-oss); unlike bias_balancing's selection-only bias it is trained by the optimizer."""
    expert_biases: bool = False
    """Biases on every routed expert's gate/up and down projections (gpt-oss), in every expert path and layout."""
    swiglu_limit: float = 0.0
    """Routed experts' clamped SwiGLU (gpt-oss: 7): gate clamped above at the limit, up to [-limit, limit], before
    (up + swiglu_up_offset) * gate * sigmoid(swiglu_alpha * gate); 0: no clamp."""
    swiglu_alpha: float = 1.0
    """Gain in the experts' gate sigmoid: gate * sigmoid(alpha * gate) (1: silu; gpt-oss: 1.702)."""
    swiglu_up_offset: float = 0.0
    """Added to the experts' (clamped) up projection before the product (gpt-oss: 1)."""
    routed_scaling_factor: float = 1.0
    """Factor on the routed experts' gate weights, after renormalisation (DeepSeek-V3, GLM-4-MoE: 2.5 / 1.8)."""
    n_group: int = 1
    """Group-limited routing (DeepSeek-V3, GLM-4-MoE): experts form n_group equal groups, a token picks the
    topk_group groups whose two best selection scores sum highest, then its top_k experts within them; 1: off."""
    topk_group: int = 1
    """Groups a token may route to when n_group > 1."""
    group_score: Literal["top2_sum", "max"] = "top2_sum"
    """How n_group > 1 scores a group: the sum of its two best selection scores ('top2_sum', DeepSeek-V3,
    GLM-4-MoE) or its best one ('max', DeepSeek-V2's group_limited_greedy)."""
    score_func: Literal["softmax", "sigmoid"] = "softmax"
    """Router scores: 'softmax' over experts, or 'sigmoid' per expert (DeepSeek-V3)."""
    renormalize: bool = True
    """Rescale the top-k scores of a token to sum to 1. With top_k=1 and softmax this makes every gate 1, so the
    router then learns only through the auxiliary losses; Switch (top_k=1) leaves it off."""
    noisy_gating: bool = False
    """Noisy top-k gating (Shazeer 2017): add N(0,1) * softplus(x W_noise) to the router logits while training.
    The noise is keyed by (train.seed, optimizer step, the token's position in the global batch), so every
    layout and micro-batch size draws the same noise for the same token (and a recomputed forward, under
    parallel.recompute, draws it again)."""
    bias_balancing: bool = False
    """Auxiliary-loss-free balancing (Wang 2024, DeepSeek-V3): a per-expert bias added to the scores for the
    top-k selection only, moved by bias_update_rate toward uniform load after every optimizer step."""
    bias_update_rate: float = 1e-3
    """Step of the bias update: bias_i += rate * sign(mean load - load_i), load counted over the global batch."""
    aux_loss_coef: float = 1e-2
    """Coefficient of the Switch/GShard load-balancing loss E * sum_i f_i * P_i (f_i: fraction of routed
    assignments, P_i: mean router probability); 0 disables it."""
    z_loss_coef: float = 1e-3
    """Coefficient of the ST-MoE router z-loss mean(logsumexp(logits)^2); 0 disables it."""
    drop_tokens: bool = False
    """Limit each expert to capacity_factor * tokens * top_k / num_experts assignments per balance_scope group
    (tokens: the group's), dropping the rest in drop_policy order (their residual passes through); false is
    dropless."""
    capacity_factor: float = 1.25
    """Expert capacity relative to a perfectly even split; used when drop_tokens is true."""
    drop_policy: Literal["position", "probability"] = "position"
    """Which assignments an expert over capacity keeps: 'position' - the earliest positions first (Switch,
    GShard), so no token is dropped because of a later one and the model stays causal; 'probability' - the
    highest routing probability first, which lets a later token push an earlier one out: NOT causal (a
    position's output depends on future tokens), for non-autoregressive use or ablations only."""
    balance_scope: Literal["sequence", "micro_batch"] = "sequence"
    """Tokens the balancing loss statistics and the expert capacity are taken over: 'sequence' - each sequence
    alone, the loss averaged over sequences (DeepSeek-V3's sequence-wise balance loss, Megatron's
    seq_aux_loss), so results do not depend on the micro-batch size or the parallel layout; 'micro_batch' -
    all tokens of a micro-batch on one rank (Switch, DeepSpeed): losses, gradients and drops then change
    with train.micro_batch_size and the data-parallel degree (layout-dependent)."""
    expert_impl: Literal["auto", "grouped_mm", "padded"] = "auto"
    """Grouped expert matmul: 'grouped_mm' (torch._grouped_mm), 'padded' (one bmm over groups padded to the
    largest), 'auto' (grouped_mm on CPU and on compute-capability >= 9.0 GPUs in bf16, padded elsewhere)."""


def resolved_expert_hidden(cfg) -> int:
    m = cfg.moe
    return m.expert_hidden or max(1, cfg.model.ffn_hidden // (m.top_k + m.num_shared_experts))


def resolved_shared_hidden(cfg) -> int:
    """Joint hidden width of the shared experts (0: none): moe.shared_expert_hidden, else moe.num_shared_experts
    times the routed experts' width."""
    m = cfg.moe
    if not m.num_shared_experts:
        return 0
    return m.shared_expert_hidden or m.num_shared_experts * resolved_expert_hidden(cfg)


def validate_moe(cfg) -> None:
    m = cfg.moe
    if "moe" not in cfg.model.pattern:
        return
    require(m.num_experts >= 1, f"moe.num_experts must be >= 1, got {m.num_experts}")
    require(1 <= m.top_k <= m.num_experts,
             f"moe.top_k={m.top_k} must be between 1 and moe.num_experts={m.num_experts}; lower moe.top_k or add experts")
    ep = cfg.parallel.ep
    require(m.num_experts % ep == 0,
             f"moe.num_experts={m.num_experts} is not divisible by parallel.ep={ep}; every expert-parallel rank "
             f"holds the same number of experts")
    require(m.expert_hidden >= 0, f"moe.expert_hidden must be >= 0 (0 derives it), got {m.expert_hidden}")
    require(m.routed_scaling_factor > 0, f"moe.routed_scaling_factor must be > 0, got {m.routed_scaling_factor}")
    require(not m.shared_expert_gate or m.num_shared_experts > 0,
            "moe.shared_expert_gate=true needs shared experts; set moe.num_shared_experts >= 1")
    if m.n_group > 1:
        per = m.num_experts // m.n_group
        require(m.num_experts % m.n_group == 0 and per >= 2, f"moe.n_group={m.n_group} must divide "
                f"moe.num_experts={m.num_experts} into groups of at least 2 experts")
        require(1 <= m.topk_group <= m.n_group and m.topk_group * per >= m.top_k, f"moe.topk_group={m.topk_group} "
                f"must be in [1, moe.n_group={m.n_group}] with at least moe.top_k={m.top_k} experts in the chosen groups")
    require(m.num_shared_experts >= 0, f"moe.num_shared_experts must be >= 0, got {m.num_shared_experts}")
    require(m.shared_expert_hidden >= 0 and (not m.shared_expert_hidden or m.num_shared_experts),
            f"moe.shared_expert_hidden={m.shared_expert_hidden} needs moe.num_shared_experts >= 1 (and must be >= 0; "
            "0 derives it)")
    if m.drop_tokens:
        require(m.capacity_factor > 0,
                 f"moe.capacity_factor={m.capacity_factor} must be > 0 with moe.drop_tokens=true "
                 f"(or set moe.drop_tokens=false for dropless routing)")
    require(m.swiglu_limit >= 0 and m.swiglu_alpha > 0, f"moe.swiglu_limit must be >= 0 (0: no clamp) and "
            f"moe.swiglu_alpha > 0, got {m.swiglu_limit} and {m.swiglu_alpha}")
    for name in ("aux_loss_coef", "z_loss_coef", "bias_update_rate"):
        require(getattr(m, name) >= 0, f"moe.{name} must be >= 0, got {getattr(m, name)}")
