"""Start-up checks that need no process group, run by ``sparselm.train`` before DeepSpeed or megatron-core
is imported: the layout against the launcher's world size, the config, the tokenizer and dataset files,
whether the data holds the steps, the output directory and the checkpoint to resume.

``preflight(cfg)`` raises one of ``sparselm.errors.USER_ERRORS`` (one line naming the problem and the fix)
or returns the notes to print at start-up.  The trainer repeats the checks that need the data built
(the default corpus) through the same functions.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from sparselm.checkpoint import checkpointing as ckpt
from sparselm.checkpoint.integrity import checkpoint_problems
from sparselm.config import validate
from sparselm.data.blend import is_blend
from sparselm.data.indexed import document_lengths
from sparselm.data.loader import check_dataset_tokenizer, packed_samples, train_samples_on_disk
from sparselm.data.sampler import check_steps_available
from sparselm.data.tokenizer import load_tokenizer
from sparselm.errors import ConfigError, DatasetError
from sparselm.parallel.layout import check_layout_fits_model, check_world
from sparselm.training.compile import check_compiler
from sparselm.training.ds_config import load_ds_json
from sparselm.training.zero_rules import check_zero_rules


def launcher_world_size() -> int:
    """Processes the launcher started (torchrun, deepspeed and SLURM's srun set WORLD_SIZE); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(cfg, world_size: int | None = None) -> list[str]:
    """Check ``cfg`` (loaded without validation) for a world of ``world_size`` processes; returns notes."""
    world = launcher_world_size() if world_size is None else world_size
    check_layout(cfg, world)
    validate(cfg)
    _check_zero(cfg)
    d, t = cfg.data, cfg.train
    if t.wandb_project:
        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"train.wandb_project='{t.wandb_project}' needs Weights & Biases: pip install wandb "
                              "(or leave train.wandb_project empty)")
    if t.compile:  # a two-op compile on this machine's device: a missing backend is named now, not at step 1

        check_compiler(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    if d.tokenizer != "byte" and not Path(d.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file '{d.tokenizer}' does not exist; use data.tokenizer=byte or train one "
                                "with tools/train_tokenizer.py")
    check_dataset_tokenizer(d, load_tokenizer(d.tokenizer, d.eod_token))
    notes = []
    resume = find_resume(cfg)
    consumed, start = 0, 0
    if resume is not None:
        check_same_model(cfg, ckpt.read_config(resume), resume)
        meta = ckpt.read_meta(resume)
        start = meta["step"]
        consumed = (meta.get("sampler") or {}).get("consumed", 0)
    elif t.resume == "latest":
        notes.append(f"no checkpoint in '{ckpt.checkpoints_dir(t.out_dir)}' to resume: starting at step 0")
    samples = train_samples_on_disk(d)
    if samples is not None:
        check_steps_available(samples, consumed, t.steps - start, cfg)
    if d.valid_dataset and not is_blend(d.valid_dataset):
        valid = packed_samples(int(document_lengths(d.valid_dataset).sum()), d.seq_len)
        dp = world // (cfg.parallel.tp * cfg.parallel.pp)
        if t.eval_every and valid < dp:
            raise DatasetError(f"data.valid_dataset '{d.valid_dataset}' holds {valid} samples of {d.seq_len} tokens, "
                               f"fewer than one for each of the {dp} data-parallel rank(s); give a larger "
                               "data.valid_dataset or set train.eval_every=0")
    return notes


def _check_zero(cfg) -> None:
    """The ZeRO stage and offload of the DeepSpeed JSON against the layout (``sparselm.training.zero_rules``)."""
    zero = dict(load_ds_json(cfg.parallel.ds_config).get("zero_optimization") or {})
    if cfg.parallel.zero_stage >= 0:
        zero["stage"] = cfg.parallel.zero_stage
    check_zero_rules(cfg, {"zero_optimization": zero}, cfg.parallel.ds_config)
    if cfg.train.compile and zero.get("stage", 0) == 3:
        raise ConfigError(f"train.compile=true with ZeRO stage 3 (parallel.ds_config={cfg.parallel.ds_config}): DeepSpeed's "
                          "per-module parameter gathering runs inside each compiled block and recompiles it every "
                          "step; use ZeRO stage 0-2 or set train.compile=false")


def check_layout(cfg, world: int) -> None:
    """The layout against the world and against the model, every violated rule in one message, so that
    fixing one does not only reveal the next."""
    problems = []
    for check in (lambda: check_world(cfg, world), lambda: check_layout_fits_model(cfg)):
        try:
            check()
        except ConfigError as err:
            problems.append(str(err))
    if problems:
        raise ConfigError("; and ".join(problems))


# Settings a checkpoint's tensors depend on: resuming with other values cannot load it.
SHAPE_SETTINGS = {
    "model": ("d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "vocab_size", "pattern", "tie_embeddings",
              "head_dim", "qkv_bias", "qk_norm"),
    "moe": ("num_experts", "expert_hidden", "num_shared_experts", "shared_expert_hidden", "noisy_gating", "bias_balancing", "shared_expert_gate"),
    "pkm": ("n_keys", "heads", "k_dim", "v_dim", "gated", "query_norm"),
    "attention": ("persistent_slots",),
}


def check_same_model(cfg, saved, path) -> None:
    """A resumed run keeps its checkpoint's model: name the first override that would change a tensor."""
    for section, names in SHAPE_SETTINGS.items():
        for name in names:
            ours, theirs = getattr(getattr(cfg, section), name), getattr(getattr(saved, section), name)
            if section == "model" and name == "vocab_size" and ours == 0:
                continue  # derived from the tokenizer; the checkpoint holds the resolved size
            if ours != theirs:
                raise ConfigError(f"{section}.{name}={ours!r} differs from {theirs!r} in the checkpoint being resumed "
                                  f"({path}); a resumed run keeps its model: drop the override, or start a new run "
                                  "in another train.out_dir")


def find_resume(cfg) -> Path | None:
    """The checkpoint to resume from, or None to start fresh (with train.resume_fallback, the newest whose meta.json
    and config.yaml verify; the trainer then verifies every file).  Raises ConfigError when train.out_dir already
    holds checkpoints and train.resume is empty (nothing is overwritten), CheckpointError for a bad path."""
    t = cfg.train
    existing = ckpt.latest_checkpoint(t.out_dir)
    if t.resume == "latest":
        if existing is not None and t.resume_fallback:  # the trainer hashes every file; here meta.json and config
            return next((c for c in ckpt.resume_candidates(existing)
                         if not checkpoint_problems(c, ["config.yaml"])), existing)
        return existing
    if t.resume:
        return ckpt.resolve_checkpoint(t.resume)
    if existing is not None:
        raise ConfigError(f"train.out_dir '{t.out_dir}' already holds checkpoints (latest {existing.name}); "
                          "pass --train.resume=latest to continue it, or choose another --train.out_dir")
    return None


def absolute_paths(cfg) -> None:
    """Make the dataset, validation, tokenizer, resume and out_dir paths of ``cfg`` absolute against the working directory
    (in place), so the ``config.yaml`` a run saves works from any directory (``sparselm.evaluate``,
    ``generate``, a resume).  Keywords stay as they are: ``default`` (the embedded corpus), ``byte`` (the byte
    tokenizer), ``latest``, and empty values."""
    d, t = cfg.data, cfg.train
    d.dataset = _absolute_blend(d.dataset)
    d.valid_dataset = _absolute_blend(d.valid_dataset)
    if d.tokenizer != "byte":
        d.tokenizer = _absolute(d.tokenizer)
    if t.resume not in ("", "latest"):
        t.resume = _absolute(t.resume)
    t.out_dir = _absolute(t.out_dir)  # a resume with the saved config.yaml continues this run from anywhere


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().absolute()) if path else path


def _absolute_blend(spec):
    """A prefix, a blend string 'W PREFIX W PREFIX ...' or a list of {prefix, weight, name}, prefixes made
    absolute (a blend's source names come from the prefixes' base names, which do not change)."""
    if isinstance(spec, list):
        return [{**item, "prefix": _absolute_blend(item["prefix"])} if isinstance(item, dict) and item.get("prefix")
                else item for item in spec]
    if not spec or spec == "default":
        return spec
    fields = str(spec).split()
    if len(fields) == 1:
        return _absolute(spec)
    if len(fields) % 2:
        return spec  # malformed: parse_blend names it
    return " ".join(f"{w} {_absolute_blend(p)}" for w, p in zip(fields[::2], fields[1::2]))
