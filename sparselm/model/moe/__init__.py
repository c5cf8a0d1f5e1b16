"""Mixture-of-experts layers: config section ``moe``, block kind ``moe``.

Expert parallelism is applied from outside by ``sparselm.parallel.expert.apply_expert_parallel``.
"""
from sparselm.model.moe.config import MoEConfig, resolved_expert_hidden
from sparselm.model.moe.cost import MoECost
from sparselm.model.moe.dispatch import DispatchPlan, LocalDispatcher, expert_capacity, plan_dispatch
from sparselm.model.moe.experts import GroupedExperts
from sparselm.model.moe.layer import MoELayer
from sparselm.model.moe.router import Router, Routing, balance_loss, route, z_loss
from sparselm.model.registry import default_attention, register_block


@register_block("moe", cost=MoECost())
def moe_block(cfg, layer_idx: int):
    return default_attention(cfg, layer_idx), MoELayer.from_config(cfg, layer_idx)


__all__ = ["MoEConfig", "MoELayer", "Router", "Routing", "GroupedExperts", "DispatchPlan", "LocalDispatcher",
           "route", "plan_dispatch", "expert_capacity", "balance_loss", "z_loss", "resolved_expert_hidden"]
