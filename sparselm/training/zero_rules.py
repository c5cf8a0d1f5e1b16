"""The combinations of ZeRO stage, offload and layout that DeepSpeed 0.19.8 cannot run (or that sparselm
cannot run exactly on top of it), refused at start-up with the DeepSpeed rule and a combination that works.

What does run, and equals one process (tests/distributed/test_zero3.py, tests/distributed/test_moe_distributed.py): ZeRO 0-3, with
or without parameter and optimizer offload, for every block kind; ZeRO-3 with tensor parallelism, or with
expert parallelism (experts partitioned over their expert-data-parallel group through DeepSpeed's AutoEP
placement, ``sparselm.parallel.expert.tag_experts_for_zero3``); pipelines with ZeRO 0 or 1, optimizer
offload included.
"""
from __future__ import annotations

from sparselm.errors import ConfigError


def check_zero_rules(cfg, ds: dict, source: str) -> None:
    """Raise ConfigError (one line: the settings, the DeepSpeed rule, what works) for a combination that
    cannot run.  ``ds``: the resolved DeepSpeed config; ``source``: how the user named it, for the message."""
    p = cfg.parallel
    zero = ds.get("zero_optimization", {})
    stage = zero.get("stage", 0)
    setting = f"parallel.ds_config={source}" + (f" with parallel.zero_stage={p.zero_stage}" if p.zero_stage >= 0 else "")
    if p.pp > 1 and stage >= 2:
        raise ConfigError(
            f"parallel.pp={p.pp} with ZeRO stage {stage} ({setting}): DeepSpeed's pipeline engine accepts ZeRO stage 0 "
            "or 1 only (deepspeed/runtime/pipe/engine.py: 'ZeRO-2 and ZeRO-3 are incompatible with pipeline "
            "parallelism'); add --parallel.zero_stage=1 (optimizer offload from the JSON still applies) or use "
            f"parallel.pp=1 for ZeRO-{stage}")
    moe = "moe" in cfg.model.layer_kinds()
    local = cfg.moe.num_experts // p.ep
    per = p.zero3_experts_per_gather
    if stage == 3 and moe and 0 < per < local and local % per:
        divisors = [d for d in range(1, local + 1) if local % d == 0]
        raise ConfigError(
            f"parallel.zero3_experts_per_gather={per} under ZeRO stage 3 ({setting}) does not divide the {local} "
            f"experts each rank holds (moe.num_experts={cfg.moe.num_experts} / parallel.ep={p.ep}): ZeRO-3 gathers "
            f"them in equal modules; pick one of {divisors}, or 0 for all at once")
    if stage == 3 and moe and p.ep > 1:
        if p.tp > 1:
            raise ConfigError(
                f"parallel.ep={p.ep} with parallel.tp={p.tp} under ZeRO stage 3 ({setting}): DeepSpeed's ZeRO-3 "
                "gradient norm for expert parameters (AutoEP placement, runtime/zero/stage3.py "
                "_grad_norm_counts_every_rank) assumes the expert-parallel group spans the tensor-parallel ranks, "
                "which sparselm's layout does not, so clipping would be wrong; use ZeRO-3 with parallel.tp=1 or "
                "parallel.ep=1, or ZeRO stage 1/2 (parallel.ds_config=zero1 or zero2_offload) with tp x ep")
        if zero.get("zero_quantized_gradients"):
            raise ConfigError(
                f"parallel.ep={p.ep} under ZeRO stage 3 with zero_optimization.zero_quantized_gradients ({setting}): "
                "DeepSpeed's AutoEP ZeRO-3 path does not support quantized gradients "
                "(runtime/engine.py _validate_zero3_moe_compatibility); remove zero_quantized_gradients or set "
                "parallel.ep=1")
        if zero.get("zero_hpz_partition_size", 1) > 1:
            raise ConfigError(
                f"parallel.ep={p.ep} under ZeRO stage 3 with zero_optimization.zero_hpz_partition_size="
                f"{zero['zero_hpz_partition_size']} ({setting}): DeepSpeed's AutoEP ZeRO-3 path does not support "
                "hpZeRO secondary partitions (runtime/engine.py _validate_zero3_moe_compatibility); remove "
                "zero_hpz_partition_size or set parallel.ep=1")
