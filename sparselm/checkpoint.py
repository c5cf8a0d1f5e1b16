"""Canonical, layout-free checkpoints.

``checkpoints/step_<N>/`` holds
- ``model.safetensors``: every model tensor, full and fp32, by its global name (``model.state_dict()``
  names of the single-process model);
- ``optimizer.safetensors``: Adam moments by the same names (``NAME::exp_avg``, ``NAME::exp_avg_sq``);
- ``rng_rank<R>.safetensors``: each rank's RNG state (used when resuming on the same layout);
- ``meta.json``: step, sampler position, layout saved from, versions, optimizer step;
- ``config.yaml``: the resolved config.

A checkpoint is written to a temporary directory and renamed into place; ``checkpoints/latest`` is
replaced afterwards, so a crash at any moment leaves the previous checkpoint loadable.  Nothing is
unpickled on load: tensors are safetensors, the rest JSON/YAML.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from sparselm.errors import CheckpointError

FORMAT = "sparselm-checkpoint"
VERSION = 1
MOMENTS = ("exp_avg", "exp_avg_sq")


# ---------------------------------------------------------------------------------------------
# locating
def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    pointer = checkpoints_dir(out_dir) / "latest"
    if not pointer.is_file():
        return None
    path = checkpoints_dir(out_dir) / pointer.read_text().strip()
    return path if (path / "meta.json").is_file() else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory meaning its latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path '{path}' does not exist; give a checkpoints/step_N directory or a run directory")
    if (path / "meta.json").is_file():
        return path
    for run_dir in (path, path.parent):
        found = latest_checkpoint(run_dir)
        if found is not None and (path == run_dir or path.name == "checkpoints"):
            return found
    raise CheckpointError(f"'{path}' is neither a checkpoint (no meta.json) nor a run directory with checkpoints/latest")


def read_meta(ckpt: Path) -> dict:
    try:
        meta = json.loads((ckpt / "meta.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CheckpointError(f"'{ckpt / 'meta.json'}' is unreadable ({err}); the checkpoint is damaged, use an earlier one") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{ckpt}' is not a sparselm checkpoint (meta.json format={meta.get('format')!r})")
    return meta


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, use an earlier one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({err}); use an earlier checkpoint") from None


def read_config(ckpt: Path):
    from sparselm.config import ConfigError, config_from_dict

    try:
        return config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, ConfigError) as err:
        raise CheckpointError(f"'{ckpt / 'config.yaml'}' cannot be read as a sparselm config: {err}") from None


# ---------------------------------------------------------------------------------------------
# full (canonical) tensors from a DeepSpeed engine
def _zero_managed(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id") or hasattr(p, "_hp_mapping")


def base_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def _adam_state(engine, p):
    """The base optimizer's state dict of a parameter that ZeRO does not manage."""
    return base_optimizer(engine).state[p]


def _stateful_tensors(engine) -> list[torch.Tensor]:
    """The tensors the base optimizer keys its state by.  ZeRO-3 keys it by flat fp32 partitions that
    sit outside ``param_groups`` between steps."""
    opt = base_optimizer(engine)
    tensors = [p for group in opt.param_groups for p in group["params"]]
    return tensors + list(getattr(engine.optimizer, "fp32_partitioned_groups_flat", []))


def link_optimizer_state(engine) -> None:
    """Make every parameter's Adam moments exist and be reachable through DeepSpeed's fragment API.

    Adam creates its state lazily at the first step; before it, moments are created as zeros (the
    values a first step starts from) so a checkpoint can be loaded into them.  DeepSpeed's ZeRO 1/2
    links fragments after the first parameter group's step only, leaving later groups unlinked; the
    link is redone here for all groups."""
    opt = base_optimizer(engine)
    integer_steps = "DeepSpeedCPUAdam" in type(opt).__name__
    for p in _stateful_tensors(engine):
        st = opt.state[p]
        if "exp_avg" not in st:
            st["step"] = 0 if integer_steps else torch.zeros((), dtype=torch.float32)
            st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
    zero = engine.optimizer
    if hasattr(zero, "_hp_optimizer_states_linked") and hasattr(zero, "_lazy_init_hp_params_optimizer_state"):
        zero._hp_optimizer_states_linked = False
        zero._lazy_init_hp_params_optimizer_state()


def _local_tensors(model) -> dict[str, torch.Tensor]:
    """Local name -> tensor for parameters and persistent buffers (one entry per tied parameter)."""
    out = dict(model.named_parameters())
    for name, tensor in model.state_dict(keep_vars=True).items():
        out.setdefault(name, tensor)
    return out


def _full_fp32(p) -> torch.Tensor:
    from deepspeed.utils import safe_get_full_fp32_param

    return safe_get_full_fp32_param(p) if isinstance(p, torch.nn.Parameter) and _zero_managed(p) else p


def collect_state(engine, model, groups: dict, pp_group=None) -> tuple[dict | None, dict | None]:
    """Collective: (canonical model tensors, canonical Adam moments) on global rank 0, (None, None) elsewhere."""
    from deepspeed.utils import safe_get_full_optimizer_state

    from sparselm.parallel.canonical import gather_full, shard_of

    link_optimizer_state(engine)
    names = canonical_names_of(model)
    params = dict(model.named_parameters())
    weights, moments, specs = {}, {}, {}
    for local, tensor in _local_tensors(model).items():
        canon = names[local]
        specs[canon] = shard_of(tensor)
        weights[canon] = _full_fp32(tensor).detach().float().cpu()
        p = params.get(local)
        if p is None:
            continue
        for key in MOMENTS:
            value = safe_get_full_optimizer_state(p, key) if _zero_managed(p) else _adam_state(engine, p).get(key)
            if value is not None:
                moments[f"{canon}::{key}"] = value.detach().float().cpu()
                specs[f"{canon}::{key}"] = specs[canon]
    return gather_full(weights, specs, groups, pp_group), gather_full(moments, specs, groups, pp_group)


def canonical_names_of(model) -> dict[str, str]:
    from sparselm.parallel.canonical import canonical_names

    return canonical_names(model)


def load_full_state(engine, model, tensors: dict, moments: dict | None, optimizer_step: int,
                    groups: dict | None = None) -> None:
    """Write canonical fp32 master weights and Adam moments into an initialised engine (any ZeRO stage,
    any layout: each rank takes its own piece).  The module's working weights must already hold the
    checkpoint (load it into the full model before parallelising and building the engine)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    from sparselm.parallel.canonical import local_piece, shard_of

    aliases = getattr(model, "canonical_aliases", {})
    names = {local: aliases.get(canon, canon) for local, canon in canonical_names_of(model).items()}
    params = dict(model.named_parameters())
    for local, p in params.items():
        if _zero_managed(p):  # the fp32 master copy ZeRO steps from
            safe_set_full_fp32_param(p, local_piece(tensors[names[local]], shard_of(p), groups).to(p.device))
    if not moments:
        return
    link_optimizer_state(engine)
    for local, p in params.items():
        for key in MOMENTS:
            value = moments.get(f"{names[local]}::{key}")
            if value is None:
                continue
            value = local_piece(value, shard_of(p), groups)
            if _zero_managed(p):
                safe_set_full_optimizer_state(p, value.to(p.device), key)
            else:
                _adam_state(engine, p)[key].copy_(value)
    _set_optimizer_step(engine, optimizer_step)


def _set_optimizer_step(engine, step: int) -> None:
    opt = base_optimizer(engine)
    for group in opt.param_groups:
        if "step" in group:  # DeepSpeedCPUAdam also counts steps per group
            group["step"] = step
    for p in _stateful_tensors(engine):
        st = opt.state.get(p)
        if st is not None and "step" in st:
            st["step"] = torch.tensor(float(step)) if torch.is_tensor(st["step"]) else step


def optimizer_step_count(engine) -> int:
    opt = base_optimizer(engine)
    for p in _stateful_tensors(engine):
        st = opt.state.get(p)
        if st and "step" in st:
            return int(st["step"])
    return 0


def _drop_aliases(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """safetensors refuses aliased tensors: keep only the first name of each tied parameter.
    Keys may carry a ``::suffix`` (optimizer moments)."""
    names = canonical_names_of(model)
    all_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    aliases = {names.get(n, n) for n in all_names - {n for n, _ in model.named_parameters()}}
    aliases |= set(getattr(model, "canonical_aliases", {}))  # tied across pipeline stages
    return {k: v for k, v in tensors.items() if k.split("::")[0] not in aliases}


def save_checkpoint(out_dir, step: int, engine, model, cfg, sampler_state: dict, layout: dict, keep_last: int,
                    groups: dict | None = None, pp_group=None) -> Path:
    """Collective: every rank calls it; global rank 0 writes the canonical files."""
    import torch.distributed as dist

    from sparselm.config import to_yaml

    rank = dist.get_rank()
    ckdir = checkpoints_dir(out_dir)
    final = ckdir / f"step_{step}"
    tmp = ckdir / f".tmp_step_{step}"
    weights, moments = collect_state(engine, model, groups or {}, pp_group)
    opt_step = optimizer_step_count(engine)
    if rank == 0:
        for stale in ckdir.glob(".tmp_step_*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    save_file({f"rank{rank}": torch.get_rng_state()}, str(tmp / f"rng_rank{rank}.safetensors"))
    if rank == 0:
        save_file(_drop_aliases(weights, model), str(tmp / "model.safetensors"))
        save_file(_drop_aliases(moments, model), str(tmp / "optimizer.safetensors"))
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        meta = {"format": FORMAT, "version": VERSION, "step": step, "optimizer_step": opt_step,
                "sampler": sampler_state, "layout": layout, "world_size": dist.get_world_size(),
                "versions": _versions()}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        pointer_tmp = ckdir / ".latest.tmp"
        pointer_tmp.write_text(final.name + "\n")
        os.replace(pointer_tmp, ckdir / "latest")
        _prune(ckdir, keep_last, final)
    dist.barrier()
    return final


def _prune(ckdir: Path, keep_last: int, newest: Path) -> None:
    if keep_last <= 0:
        return
    steps = sorted((p for p in ckdir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def _versions() -> dict:
    import deepspeed
    import megatron.core

    import sparselm

    return {"sparselm": sparselm.__version__, "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "megatron_core": megatron.core.__version__}


# ---------------------------------------------------------------------------------------------
# loading
def expected_shapes(model) -> dict[str, tuple]:
    """Full shapes of every model tensor (ZeRO-3 partitions parameters but keeps ``ds_shape``)."""
    shapes = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    for name, p in model.named_parameters(remove_duplicate=False):
        shapes[name] = tuple(getattr(p, "ds_shape", p.shape))
    return shapes


def check_tensors_match(model, tensors: dict, source: Path) -> None:
    expected = expected_shapes(model)
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in expected if k not in tensors and k not in tied]
    unexpected = [k for k in tensors if k not in expected]
    wrong = [f"{k} {tuple(tensors[k].shape)} vs model {expected[k]}"
             for k in expected if k in tensors and tuple(tensors[k].shape) != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {wrong[:5]}" if wrong else ""]))
        raise CheckpointError(f"'{source}' does not match the model its config describes: {detail}")


def load_model(path):
    """(model, config) on CPU in fp32 from a checkpoint or run directory."""
    from sparselm.model import build_model

    ckpt = resolve_checkpoint(path)
    read_meta(ckpt)
    cfg = read_config(ckpt)
    model = build_model(cfg)
    tensors = read_tensors(ckpt / "model.safetensors")
    check_tensors_match(model, tensors, ckpt / "model.safetensors")
    model.load_state_dict(tensors, strict=False)
    model.eval()
    return model, cfg
