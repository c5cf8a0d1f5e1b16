"""DeepSpeed engine construction: the JSON from ds_configs/ completed from our config.

Batch sizes, accumulation and clipping always come from our config (so a layout change never changes
the batch); ZeRO stage, offload and precision come from the JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sparselm.config import ConfigError
from sparselm.optim import param_groups

DS_CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"


def load_ds_json(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"parallel.ds_config: '{name_or_path}' is neither a file nor one of {names}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"parallel.ds_config: '{path}' is not valid JSON: {err}") from None


def build_ds_config(cfg, dp_size: int) -> dict:
    t = cfg.train
    per_rank = t.global_batch_size // dp_size
    micro = t.micro_batch_size or per_rank
    ds = load_ds_json(cfg.parallel.ds_config)
    ds.update(
        train_batch_size=t.global_batch_size,
        train_micro_batch_size_per_gpu=micro,
        gradient_accumulation_steps=per_rank // micro,
        gradient_clipping=cfg.optim.grad_clip,
        steps_per_print=10**9,
        wall_clock_breakdown=False,
    )
    if cfg.parallel.pp > 1:
        # DeepSpeed partitions the activations sent between stages over the TP group whenever tp > 1, which
        # requires later stages' outputs not to need grad; ours carry the aux loss, which does.
        ds.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.parallel.zero_stage >= 0:
        zero["stage"] = cfg.parallel.zero_stage
    if ds.get("fp16", {}).get("enabled") and not torch.cuda.is_available():
        raise ConfigError(f"parallel.ds_config={cfg.parallel.ds_config} enables fp16, which needs a CUDA GPU "
                          "(DeepSpeed's CPU accelerator rejects it); use parallel.ds_config=bf16 on CPU")
    if zero.get("stage", 0) >= 2 and cfg.parallel.pp > 1:
        raise ConfigError(f"parallel.pp={cfg.parallel.pp} needs ZeRO stage 0 or 1 (DeepSpeed's pipeline engine); set parallel.zero_stage=1 or parallel.ds_config=zero1")
    return ds


def offloads_optimizer(ds: dict) -> bool:
    return ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none") == "cpu"


def make_optimizer(model: torch.nn.Module, cfg, ds: dict):
    groups = param_groups(model, cfg.optim)
    # [moe] expert-parallel parameters go in their own groups (DeepSpeed reduces them over expert-data-parallel ranks)
    from sparselm.parallel.expert import split_expert_param_groups

    groups = split_expert_param_groups(groups)
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def precision_dtype(ds: dict) -> torch.dtype:
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


def build_engine(model, cfg, dp_size: int, mpu=None):
    """deepspeed.initialize with our optimizer; returns (engine, ds_config)."""
    import deepspeed

    ds = build_ds_config(cfg, dp_size)
    optimizer = make_optimizer(model, cfg, ds)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, mpu=mpu)
    _keep_stage0_grad_norm(engine)
    return engine, ds


def _keep_stage0_grad_norm(engine) -> None:
    """Without ZeRO, DeepSpeed's fp32 clipping computes the global norm and discards it; keep it so
    ``engine.get_global_grad_norm()`` reports it as it does under ZeRO."""
    from deepspeed.moe.utils import is_moe_param
    from deepspeed.runtime.utils import clip_grad_norm_

    if any(is_moe_param(p) for p in engine.module.parameters()):
        # [moe] DeepSpeed's stage-0 norm averages per-rank norms; expert shards need their squares summed
        from sparselm.parallel.expert import clip_grad_norm_ as clip_with_experts

        def clip_and_record():
            engine._global_grad_norm = clip_with_experts(engine.module.parameters(), engine.gradient_clipping(),
                                                         mpu=engine.mpu)

        engine.clip_fp32_gradients = clip_and_record
        return

    def clip_and_record():
        engine._global_grad_norm = clip_grad_norm_(parameters=engine.module.parameters(),
                                                   max_norm=engine.gradient_clipping(), mpu=engine.mpu)

    engine.clip_fp32_gradients = clip_and_record
