"""Writing model-only sparselm checkpoints (consolidated, imported or upcycled models)."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sparselm.checkpoint import FORMAT, VERSION, _versions, write_safetensors
from sparselm.config import to_yaml
from sparselm.errors import ConversionError


def write_model_checkpoint(out_dir: str | Path, tensors: dict[str, torch.Tensor], cfg, source: str,
                           step: int = 0, extra_files: dict[str, Path] | None = None) -> Path:
    """A checkpoint with weights and config only: loadable by ``load_model`` and usable as
    ``--train.resume`` (fresh optimizer, fresh data order).  Written atomically; an existing
    non-empty output directory is refused so nothing is overwritten."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory '{out}' exists and is not empty; choose a new --output")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_safetensors({k: v.contiguous() for k, v in tensors.items()}, tmp / "model.safetensors")
    write_safetensors({}, tmp / "optimizer.safetensors")
    for name, path in (extra_files or {}).items():
        shutil.copy(path, tmp / name)
    (tmp / "config.yaml").write_text(to_yaml(cfg))
    meta = {"format": FORMAT, "version": VERSION, "step": step, "optimizer_step": 0, "sampler": None,
            "layout": None, "world_size": None, "versions": _versions(), "source": source}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out
