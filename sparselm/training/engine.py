"""DeepSpeed engine construction: the JSON from ds_configs/ completed from our config.

Batch sizes, accumulation, clipping, the optimizer and its schedule always come from our config (so a
layout change never changes the batch); ZeRO stage, offload and precision come from the JSON
(``sparselm.training.ds_config`` states the rule).
"""
from __future__ import annotations

import deepspeed
import torch
import torch.distributed as dist

from sparselm.config import ConfigError
from sparselm.parallel.deepspeed_private import pipeline_backward_in_one_call, replace_fp32_clipping
from sparselm.parallel.expert import clip_grad_norm_, tag_experts_for_zero3
from sparselm.training.ds_config import load_ds_json, resolve_ds_json
from sparselm.training.optim import param_groups
from sparselm.training.zero_rules import check_zero_rules


def build_ds_config(cfg, dp_size: int, notes: list[str] | None = None, cuda: bool | None = None) -> dict:
    """The DeepSpeed config of this run: the user's JSON resolved by ``sparselm.training.ds_config`` (sparselm owns the
    batch, optimizer, schedule and clipping), then our fixed settings.  ``notes`` (a list) receives what the
    resolution changed or passed through, for the start-up log.  ``cuda``: whether the run has CUDA GPUs
    (None: this machine's; a planner passes the target's).  Raises ConfigError naming the key."""
    raw = load_ds_json(cfg.parallel.ds_config)
    ds, found = resolve_ds_json(raw, cfg, dp_size, cfg.parallel.ds_config)
    if notes is not None:
        notes.extend(found)
    if cfg.parallel.cp > 1:
        # DeepSpeed's data axis holds the data x context-parallel ranks (the mpu's data group), each of which runs
        # every micro-batch of its data-parallel rank: its batch bookkeeping counts each sample cp times.
        ds["train_batch_size"] *= cfg.parallel.cp
    if cfg.parallel.pp > 1:
        # DeepSpeed partitions the activations sent between stages over the TP group whenever tp > 1, which
        # requires later stages' outputs not to need grad; ours carry the aux loss, which does.
        ds.setdefault("pipeline", {}).update(pipe_partitioned=False, grad_partitioned=False)
    zero = ds.setdefault("zero_optimization", {"stage": 0})
    if cfg.parallel.zero_stage >= 0:
        zero["stage"] = cfg.parallel.zero_stage
    if ds.get("fp16", {}).get("enabled") and not (torch.cuda.is_available() if cuda is None else cuda):
        raise ConfigError(f"parallel.ds_config={cfg.parallel.ds_config} enables fp16, which needs a CUDA GPU "
                          "(DeepSpeed's CPU accelerator rejects it); use parallel.ds_config=bf16 on CPU")
    if (ds.get("bf16", {}).get("enabled") and cuda is None and torch.cuda.is_available()
            and not torch.cuda.is_bf16_supported()):
        raise ConfigError(f"parallel.ds_config={cfg.parallel.ds_config} enables bf16, which this GPU "
                          f"({torch.cuda.get_device_name()}) does not support (pre-Ampere); use parallel.ds_config=fp16")
    check_zero_rules(cfg, ds, cfg.parallel.ds_config)
    return ds


def offloads_optimizer(ds: dict) -> bool:
    """Whether DeepSpeed keeps the optimizer on the CPU: offload_optimizer set and a ZeRO stage >= 1 (stage 0
    ignores offload_optimizer, so the optimizer then steps where the parameters are)."""
    zero = ds.get("zero_optimization", {})
    return zero.get("stage", 0) >= 1 and zero.get("offload_optimizer", {}).get("device", "none") == "cpu"


def optimizer_groups(model: torch.nn.Module, cfg) -> list[dict]:
    groups = param_groups(model, cfg.optim)
    # [moe] expert-parallel parameters go in their own groups (DeepSpeed reduces them over expert-data-parallel ranks)
    from sparselm.parallel.expert import split_expert_param_groups

    return split_expert_param_groups(groups)


def settle_pipeline_zero_stage(module: torch.nn.Module, cfg, pp_group) -> str | None:
    """ZeRO-1 reduces the gradient norm over the pipeline once per parameter group; stages holding
    different groups (PKM values or experts on some stages only) would wait on each other forever.
    Such runs use ZeRO stage 0 (optimizer state not partitioned).  Returns a note when it changed."""
    stage = build_ds_config(cfg, 1)["zero_optimization"].get("stage", 0)
    mine = [g["name"] for g in optimizer_groups(module, cfg)]
    every = [None] * dist.get_world_size(pp_group)
    dist.all_gather_object(every, mine, group=pp_group)
    if stage == 0 or all(names == mine for names in every):
        return None
    offload = offloads_optimizer(build_ds_config(cfg, 1))
    cfg.parallel.zero_stage = 0
    return (f"pipeline stages hold different parameter groups ({every}); DeepSpeed's ZeRO-{stage} would "
            "deadlock reducing their norms, so this run uses ZeRO stage 0"
            + (" (without optimizer offload, which needs ZeRO stage >= 1)" if offload else ""))


def make_optimizer(model: torch.nn.Module, cfg, ds: dict, cuda: bool | None = None):
    """DeepSpeed's CPU Adam under optimizer offload; else torch's AdamW, fused (one kernel for all tensors;
    DeepSpeed measured its optimizer phase 220 ms -> 18.5 ms with it) when the run has CUDA GPUs (``cuda``,
    None: this machine's), per tensor on CPU.  Both give the same numbers (tests/unit/training/test_optimizer_fused.py)."""
    groups = optimizer_groups(model, cfg)
    o = cfg.optim
    kwargs = dict(lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, weight_decay=o.weight_decay)
    if offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    if torch.cuda.is_available() if cuda is None else cuda:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    return torch.optim.AdamW(groups, foreach=False, **kwargs)


def build_engine(model, cfg, dp_size: int, mpu=None, norm_mpu=None, nonfinite=None):
    """deepspeed.initialize with our optimizer; returns (engine, ds_config).  ``mpu`` goes to DeepSpeed
    (None for pipelines); ``norm_mpu`` (megatron-core's groups, pipeline included) serves the norm;
    ``nonfinite``: a ``NonFiniteGuard`` that protects the optimizer where DeepSpeed would apply a non-finite step."""
    ds = build_ds_config(cfg, dp_size)
    if ds["zero_optimization"].get("stage", 0) == 3:
        tag_experts_for_zero3(model)
    optimizer = make_optimizer(model, cfg, ds)
    if nonfinite is not None and ds["zero_optimization"].get("stage", 0) == 0 and not ds.get("fp16", {}).get("enabled"):
        nonfinite.protect(optimizer)  # ZeRO stages 1-3 and fp16 skip an overflowing step themselves
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds, mpu=mpu)
    place_buffers(engine.module, engine.device)
    if cfg.parallel.pp > 1:
        pipeline_backward_in_one_call(engine)  # each recomputed block recomputed once per micro-batch
    _keep_stage0_grad_norm(engine, norm_mpu if norm_mpu is not None else mpu)
    return engine, ds


def place_buffers(module: torch.nn.Module, device) -> list[str]:
    """Move every buffer of ``module`` to ``device`` (the engine's) and return the names moved.  Under ZeRO
    stage 3 the parameters are partitioned onto the device as they are built and ``deepspeed.initialize``
    then leaves the module where it is (``is_zero_init_model``), so buffers (rotary frequencies, MoE load
    counters and biases, PKM usage statistics) would stay on the CPU while the forward runs on the GPU."""
    device = torch.device(device)
    moved = []
    for prefix, sub in module.named_modules():
        for name, buf in sub._buffers.items():
            if buf is not None and buf.device != device:
                sub._buffers[name] = buf.to(device)
                moved.append(f"{prefix}.{name}" if prefix else name)
    return moved


def _keep_stage0_grad_norm(engine, norm_mpu) -> None:
    """Without ZeRO, DeepSpeed's fp32 clipping averages per-rank norms (wrong under expert parallelism) and
    discards the result.  Clip by the true global norm instead (``sparselm.parallel.expert``: expert shards
    summed over their group, tensor-parallel replicas counted once, every pipeline stage included through
    ``norm_mpu``'s model-parallel group) and keep it for ``engine.get_global_grad_norm()``."""
    replace_fp32_clipping(engine, lambda: clip_grad_norm_(engine.module.parameters(), engine.gradient_clipping(),
                                                          mpu=norm_mpu))
