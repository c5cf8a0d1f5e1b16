"""Writing model-only sparselm checkpoints (consolidated, imported or upcycled models)."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

from sparselm.checkpoint.checkpointing import FORMAT, MODEL_DIR, VERSION, library_versions
from sparselm.checkpoint.integrity import copy_file, manifest, seal, write_bytes
from sparselm.checkpoint.shards import write_consolidated
from sparselm.config import to_yaml
from sparselm.errors import ConversionError


def write_model_checkpoint(out_dir: str | Path, tensors, cfg, source: str, step: int = 0,
                           extra_files: dict[str, Path] | None = None, dtype=None,
                           max_shard_bytes: int = 2 << 30) -> Path:
    """A checkpoint with weights and config only: loadable by ``load_model`` and usable as
    ``--train.resume`` (fresh optimizer, fresh data order).  ``tensors``: a dict, or a checkpoint's reader (then
    read and written one shard of at most ``max_shard_bytes`` at a time, cast to ``dtype`` if given), into
    Hugging Face-style shards under ``model/``.  Written atomically; an existing non-empty output directory is
    refused so nothing is overwritten."""
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output directory '{out}' exists and is not empty; choose a new --output")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    names = list(tensors.keys())
    shapes = getattr(tensors, "shapes", None) or {n: tuple(t.shape) for n, t in tensors.items()}

    def dtype_of(name):
        own = tensors.dtype(name) if hasattr(tensors, "dtype") else tensors[name].dtype
        return dtype if dtype is not None and own.is_floating_point else own

    def get(name):
        return tensors[name].to(dtype_of(name))

    nbytes = {n: math.prod(shapes[n]) * dtype_of(n).itemsize for n in names}
    written = write_consolidated(names, nbytes, get, tmp / MODEL_DIR, max_shard_bytes)
    entries = {f"{MODEL_DIR}/{k}": v for k, v in written.items()}  # checksums as written
    for name, path in (extra_files or {}).items():
        entries[name] = copy_file(Path(path), tmp / name)
    entries["config.yaml"] = write_bytes(tmp / "config.yaml", to_yaml(cfg).encode())
    meta = {"format": FORMAT, "version": VERSION, "step": step, "optimizer_step": 0, "sampler": None,
            "layout": None, "world_size": None, "versions": library_versions(), "source": source,
            "tensors": {n: list(shapes[n]) for n in sorted(names)},
            "files": {k: e["bytes"] for k, e in sorted(entries.items())}, "checksums": manifest(entries)}
    (tmp / "meta.json").write_text(seal(meta))
    if out.exists():
        out.rmdir()
    os.rename(tmp, out)
    return out


def clear_output(out_dir: str | Path, force: bool) -> None:
    """``--force``: remove an existing output directory (call it after every check passed); without ``force``
    nothing is removed and the writers refuse a non-empty one."""
    out = Path(out_dir)
    if force and out.exists():
        shutil.rmtree(out)
