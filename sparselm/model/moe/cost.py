"""Cost model of block kind ``moe``: router, shared experts and top-k routed SwiGLU experts (GShard /
Switch-style dropless routing; drop_tokens=true makes the FLOPs an upper bound)."""
from __future__ import annotations

from sparselm.model.cost import BlockCost, swiglu_activations, swiglu_matmul_outputs, swiglu_params
from sparselm.model.moe.config import resolved_expert_hidden, resolved_shared_hidden


class MoECost(BlockCost):
    """A mixture-of-experts slot: router (its noise projection under moe.noisy_gating), moe.num_shared_experts
    shared experts (with their gate), moe.num_experts routed experts of which moe.top_k run per token."""

    def slot_params(self, cfg, layer_idx: int) -> tuple[int, int]:
        """(total, active per token): router + shared + every routed expert (with its biases under
        moe.expert_biases), or + top_k of them."""
        e, d, hidden = cfg.moe, cfg.model.d_model, resolved_expert_hidden(cfg)
        router, shared = self._router(cfg), self._shared(cfg)
        expert = swiglu_params(d, hidden) + ((2 * hidden + d) if e.expert_biases else 0)
        return router + shared + e.num_experts * expert, router + shared + e.top_k * expert

    def slot_flops(self, cfg, layer_idx: int) -> dict[str, float]:
        """Forward FLOPs per token: moe_router, moe_shared, moe_experts (top_k experts)."""
        expert = swiglu_params(cfg.model.d_model, resolved_expert_hidden(cfg))
        router = self._router(cfg) - (cfg.moe.num_experts if cfg.moe.router_bias else 0)  # its bias adds: not matmul FLOPs
        return {"moe_router": 2 * router, "moe_shared": 2 * self._shared(cfg),
                "moe_experts": 2 * cfg.moe.top_k * expert}

    def slot_activations(self, cfg, tp: int, act_bytes: int) -> float:
        """Router logits and probabilities (fp32), the k dispatched copies of the token (before and after the
        experts) and their SwiGLU hidden units, the shared experts' hidden units."""
        e, k, h = cfg.moe.num_experts, cfg.moe.top_k, resolved_expert_hidden(cfg)
        return (2 * e * 4 / act_bytes + 2 * k * cfg.model.d_model + k * swiglu_activations(h, tp)
                + swiglu_activations(resolved_shared_hidden(cfg), tp))

    def slot_matmul_outputs(self, cfg, tp: int, act_bytes: int) -> float:
        """Router logits (fp32) and the routed and shared experts' projections."""
        e, k, h, d = cfg.moe.num_experts, cfg.moe.top_k, resolved_expert_hidden(cfg), cfg.model.d_model
        shared = swiglu_matmul_outputs(d, resolved_shared_hidden(cfg), tp) if cfg.moe.num_shared_experts else 0
        return e * 4 / act_bytes + k * swiglu_matmul_outputs(d, h, tp) + shared

    def tp_widths(self, cfg) -> list[tuple[int, str]]:
        """Routed experts' hidden width (unless parallel.moe_tp_mode='rows' keeps them whole) and the shared
        experts' joint width."""
        hidden, widths = resolved_expert_hidden(cfg), []
        if cfg.parallel.moe_tp_mode == "weights":
            widths.append((hidden, "moe.expert_hidden (routed experts; or parallel.moe_tp_mode=rows)"))
        if cfg.moe.num_shared_experts:
            widths.append((resolved_shared_hidden(cfg), "moe.shared_expert_hidden (or moe.expert_hidden x "
                           "moe.num_shared_experts: the shared experts)"))
        return widths

    def routed_copies(self, cfg) -> int:
        """moe.top_k copies of each token go to experts."""
        return cfg.moe.top_k

    @staticmethod
    def _router(cfg) -> int:
        e = cfg.moe
        return e.num_experts * cfg.model.d_model * (2 if e.noisy_gating else 1) + (e.num_experts if e.router_bias else 0)

    @staticmethod
    def _shared(cfg) -> int:
        e, d = cfg.moe, cfg.model.d_model
        return swiglu_params(d, resolved_shared_hidden(cfg)) + (d if e.shared_expert_gate else 0)
