"""Start-up checks that need no process group, run by ``sparselm.train`` before DeepSpeed or megatron-core
is imported: the layout against the launcher's world size, the config, the tokenizer and dataset files,
whether the data holds the steps, the output directory and the checkpoint to resume.

``preflight(cfg)`` raises one of ``sparselm.errors.USER_ERRORS`` (one line naming the problem and the fix)
or returns the notes to print at start-up.  The trainer repeats the checks that need the data built
(the default corpus) through the same functions.
"""
from __future__ import annotations

import os
from pathlib import Path

from sparselm.config import validate
from sparselm.errors import ConfigError
from sparselm.parallel.layout import check_world


def launcher_world_size() -> int:
    """Processes the launcher started (torchrun, deepspeed and SLURM's srun set WORLD_SIZE); 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def preflight(cfg, world_size: int | None = None) -> list[str]:
    """Check ``cfg`` (loaded without validation) for a world of ``world_size`` processes; returns notes."""
    from sparselm import checkpoint as ckpt
    from sparselm.data.loader import train_samples_on_disk
    from sparselm.data.sampler import check_steps_available

    world = launcher_world_size() if world_size is None else world_size
    check_world(cfg, world)  # first: a layout that does not fit the world is named as such
    validate(cfg)
    d, t = cfg.data, cfg.train
    if t.wandb_project:
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise ConfigError(f"train.wandb_project='{t.wandb_project}' needs Weights & Biases: pip install wandb "
                              "(or leave train.wandb_project empty)")
    if d.tokenizer != "byte" and not Path(d.tokenizer).is_file():
        raise FileNotFoundError(f"tokenizer file '{d.tokenizer}' does not exist; use data.tokenizer=byte or train one "
                                "with tools/train_tokenizer.py")
    notes = []
    resume = find_resume(cfg)
    consumed, start = 0, 0
    if resume is not None:
        meta = ckpt.read_meta(resume)
        start = meta["step"]
        consumed = (meta.get("sampler") or {}).get("consumed", 0)
    elif t.resume == "latest":
        notes.append(f"no checkpoint in '{ckpt.checkpoints_dir(t.out_dir)}' to resume: starting at step 0")
    samples = train_samples_on_disk(d)
    if samples is not None:
        check_steps_available(samples, consumed, t.steps - start, cfg)
        if d.valid_dataset:
            from sparselm.data.indexed import document_lengths

            document_lengths(d.valid_dataset)  # exists, and is a Megatron index with tokens
    return notes


def find_resume(cfg) -> Path | None:
    """The checkpoint to resume from, or None to start fresh.  Raises ConfigError when train.out_dir already
    holds checkpoints and train.resume is empty (nothing is overwritten), CheckpointError for a bad path."""
    from sparselm import checkpoint as ckpt

    t = cfg.train
    existing = ckpt.latest_checkpoint(t.out_dir)
    if t.resume == "latest":
        return existing
    if t.resume:
        return ckpt.resolve_checkpoint(t.resume)
    if existing is not None:
        raise ConfigError(f"train.out_dir '{t.out_dir}' already holds checkpoints (latest {existing.name}); "
                          "pass --train.resume=latest to continue it, or choose another --train.out_dir")
    return None
