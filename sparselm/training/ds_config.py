"""DeepSpeed JSON files that users bring (``parallel.ds_config``), resolved against sparselm's config.

The rule: sparselm owns the batch (``train_batch_size``, ``train_micro_batch_size_per_gpu``,
``gradient_accumulation_steps``), the optimizer with its parameter groups, the learning-rate schedule and
gradient clipping; the JSON owns ZeRO, offload, precision and communication.  So:
- a batch or clipping key holding ``"auto"`` or sparselm's own value is filled from sparselm's config; any
  other value is refused, naming the key and the sparselm setting to use instead;
- an ``optimizer`` or ``scheduler`` block made only of ``"auto"`` values (the Hugging Face Trainer's
  files) is replaced by sparselm's AdamW and schedule, with a note; one that sets a value is refused,
  naming the value and the sparselm setting that takes it (never both in force at once);
- ``"auto"`` elsewhere is filled where sparselm has the value (precision flags: off, as Hugging Face does
  without ``--bf16``/``--fp16``; ZeRO bucket sizes from the model width, as the Hugging Face
  integration does) and refused otherwise;
- keys sparselm does not read are passed to DeepSpeed unchanged and listed at start-up.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from sparselm.config import ConfigError

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
AUTO = "auto"

# DeepSpeed key -> the sparselm setting that owns it
OWNED = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.micro_batch_size",
    "gradient_clipping": "optim.grad_clip",
}
# keys sparselm reads or sets itself; any other top-level key is passed through and listed
KNOWN = {*OWNED, "optimizer", "scheduler", "zero_optimization", "bf16", "fp16", "pipeline", "steps_per_print",
         "wall_clock_breakdown", "zero_allow_untested_optimizer"}
# where an optimizer / scheduler parameter goes in sparselm's config
OPTIMIZER_PARAMS = {"lr": "optim.lr", "weight_decay": "optim.weight_decay", "betas": ("optim.beta1", "optim.beta2"),
                    "eps": "optim.eps"}
SCHEDULER_PARAMS = {"warmup_num_steps": "optim.warmup_steps", "warmup_max_lr": "optim.lr",
                    "cos_min_ratio": "optim.min_lr_ratio", "total_num_steps": "train.steps"}
ADAM_TYPES = {"adam", "adamw"}


def load_ds_json(name_or_path: str) -> dict:
    """A preset name from ds_configs/ or a JSON path -> dict.  Raises ConfigError naming the file."""
    path = Path(name_or_path)
    if not path.suffix:
        path = DS_CONFIG_DIR / f"{name_or_path}.json"
    if not path.is_file():
        names = ", ".join(sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json")))
        raise ConfigError(f"parallel.ds_config: '{name_or_path}' is neither a file nor one of {names}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"parallel.ds_config: '{path}' is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"parallel.ds_config: '{path}' holds a JSON {type(data).__name__}, not an object")
    return data


def batch_values(cfg, dp_size: int) -> dict:
    """sparselm's values of the keys it owns, for ``dp_size`` data-parallel ranks."""
    t = cfg.train
    per_rank = t.global_batch_size // dp_size
    micro = t.micro_batch_size or per_rank
    return {"train_batch_size": t.global_batch_size, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": per_rank // micro, "gradient_clipping": cfg.optim.grad_clip}


def resolve_ds_json(raw: dict, cfg, dp_size: int, source: str) -> tuple[dict, list[str]]:
    """The user's JSON with sparselm's rule applied -> (DeepSpeed config, notes for the start-up log).

    Raises ConfigError, one line naming the key and the fix, for what the rule refuses."""
    ds = json.loads(json.dumps(raw))  # a deep copy
    notes = []
    where = f"parallel.ds_config '{source}'"
    ours = batch_values(cfg, dp_size)
    for key, setting in OWNED.items():
        value = ds.get(key, AUTO)
        if value != AUTO and not _same_number(value, ours[key]):
            raise ConfigError(f"{where}: {key}={value!r} differs from sparselm's {ours[key]} ({setting}), which owns "
                              f"it; {_owned_fix(key, value, dp_size)} to train with the JSON's value, or set '{key}' "
                              "to \"auto\" in the JSON")
        ds.pop(key, None)  # set from ``ours`` below
    o = cfg.optim
    optimizer = (f"AdamW (optim.lr={o.lr:g}, optim.beta1={o.beta1:g}, optim.beta2={o.beta2:g}, optim.eps={o.eps:g}, "
                 f"optim.weight_decay={o.weight_decay:g})")
    schedule = (f"schedule (optim.warmup_steps={o.warmup_steps} linear warmup, then cosine to "
                f"optim.min_lr_ratio={o.min_lr_ratio:g} x lr at train.steps={cfg.train.steps})")
    for block, params, owner in (("optimizer", OPTIMIZER_PARAMS, optimizer), ("scheduler", SCHEDULER_PARAMS, schedule)):
        if block in ds:
            notes.append(_drop_block(ds, block, params, owner, where))
    filled = _fill_auto(ds, cfg, where)
    if filled:
        notes.append("filled \"auto\": " + ", ".join(filled))
    passed = sorted(set(ds) - KNOWN)
    if passed:
        notes.append("passed to DeepSpeed unchanged: " + ", ".join(passed))
    ds.update(ours, steps_per_print=10**9, wall_clock_breakdown=False)
    return ds, notes


def _same_number(a, b) -> bool:
    return isinstance(a, (int, float)) and not isinstance(a, bool) and float(a) == float(b)


def _owned_fix(key: str, value, dp_size: int) -> str:
    if key == "train_batch_size":
        return f"pass --train.global_batch_size={value}"
    if key == "train_micro_batch_size_per_gpu":
        return f"pass --train.micro_batch_size={value}"
    if key == "gradient_accumulation_steps":
        return (f"pass a --train.micro_batch_size that makes train.global_batch_size / {dp_size} data-parallel "
                f"rank(s) / micro batch = {value}")
    return f"pass --optim.grad_clip={value}"


def _drop_block(ds: dict, block: str, params: dict, owner: str, where: str) -> str:
    body = ds[block]
    kind = str(body.get("type", "")) if isinstance(body, dict) else ""
    values = body.get("params", {}) if isinstance(body, dict) else {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: '{block}.params' is not an object")
    set_values = {k: v for k, v in values.items() if v != AUTO}
    if set_values:
        flags = [_override(params.get(k), k, v) for k, v in set_values.items()]
        raise ConfigError(f"{where}: '{block}.params' sets {', '.join(f'{k}={v!r}' for k, v in set_values.items())}, "
                          f"but sparselm owns the optimizer and its schedule: remove the '{block}' block and pass "
                          + " ".join(flags))
    if block == "optimizer" and kind.lower() not in ADAM_TYPES:
        raise ConfigError(f"{where}: 'optimizer.type'={kind!r}: sparselm trains with its own AdamW; remove the "
                          "'optimizer' block")
    del ds[block]
    return f"the JSON's '{block}' block ({kind or 'no type'}, all \"auto\") is replaced by sparselm's {owner}"


def _override(target, key: str, value) -> str:
    """The sparselm command-line override that carries a JSON optimizer/scheduler value."""
    if isinstance(target, tuple) and isinstance(value, (list, tuple)):
        return " ".join(f"--{t}={v}" for t, v in zip(target, value))
    if isinstance(target, str):
        return f"--{target}={value}"
    return f"(nothing for {key}: see python -m sparselm.train --help-config, section optim)"


def _auto_values(cfg) -> dict[str, object]:
    d = cfg.model.d_model
    return {
        "bf16.enabled": False, "fp16.enabled": False,  # no precision asked for: fp32, as Hugging Face without --bf16
        "zero_optimization.reduce_bucket_size": d * d,
        "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * d * d),
        "zero_optimization.stage3_param_persistence_threshold": 10 * d,
    }


def _fill_auto(ds: dict, cfg, where: str) -> list[str]:
    fills, filled = _auto_values(cfg), []

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(value, path + ".")
            elif value == AUTO:
                if path not in fills:
                    raise ConfigError(f"{where}: '{path}' is \"auto\", which sparselm has no value for; give a value "
                                      f"(auto is filled for: {', '.join(OWNED)}, {', '.join(fills)})")
                node[key] = fills[path]
                filled.append(f"{path}={json.dumps(fills[path])}")

    walk(ds, "")
    return filled


def working_dtype(ds: dict):
    """The dtype DeepSpeed trains the parameters in under the resolved config ``ds``: bf16, fp16 or fp32."""
    if ds.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32
