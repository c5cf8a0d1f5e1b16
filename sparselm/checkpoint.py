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
TOKENIZER_FILE = "tokenizer.json"
VERSION = 1


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


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict | None = None) -> None:
    """safetensors' save_file, then the file mode the process umask gives (save_file creates 0600, so
    teammates could not read checkpoints or exports)."""
    save_file(tensors, str(path), metadata=metadata)
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, use an earlier one")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({err}); use an earlier checkpoint") from None


class LazyTensors:
    """The tensors of a safetensors file, read one at a time on demand (``safe_open``: the JSON header at
    open, then only the bytes of the tensor asked for), so a rank never holds a whole checkpoint.
    ``aliases``: other names of a tensor (a tied output projection) -> the name it is stored under.
    Raises CheckpointError for a missing or corrupt file."""

    def __init__(self, path: Path, aliases: dict[str, str] | None = None):
        from safetensors import safe_open

        if not path.is_file():
            raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, use an earlier one")
        self.path, self.aliases = path, aliases or {}
        try:
            self._file = safe_open(str(path), framework="pt")
            self.shapes = {k: tuple(self._file.get_slice(k).get_shape()) for k in self._file.keys()}
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({err}); use an earlier checkpoint") from None

    def _stored(self, name: str) -> str:
        return name if name in self.shapes else self.aliases.get(name, name)

    def __contains__(self, name: str) -> bool:
        return self._stored(name) in self.shapes

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)

    def get(self, name: str, default=None):
        return self[name] if name in self else default

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(self._stored(name))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"tensor '{name}' of '{self.path}' cannot be read ({err}); use an earlier checkpoint") from None

    full = __getitem__

    def rows(self, name: str, first: int, count: int) -> torch.Tensor:
        """Rows [first, first + count) along dim 0 only (only their bytes are read)."""
        try:
            return self._file.get_slice(self._stored(name))[first:first + count]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"tensor '{name}' of '{self.path}' cannot be read ({err}); use an earlier checkpoint") from None


def read_config(ckpt: Path):
    from sparselm.config import ConfigError, config_from_dict

    try:
        return config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))
    except (OSError, yaml.YAMLError, ConfigError) as err:
        raise CheckpointError(f"'{ckpt / 'config.yaml'}' cannot be read as a sparselm config: {err}") from None


def _drop_aliases(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """safetensors refuses aliased tensors: keep only the first name of each tied parameter.
    Keys may carry a ``::suffix`` (optimizer moments)."""
    from sparselm.parallel.canonical import canonical_names

    names = canonical_names(model)
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
    from sparselm.engine_state import collect_state, optimizer_step_count

    weights, moments = collect_state(engine, model, groups or {}, pp_group)
    opt_step = optimizer_step_count(engine)
    if rank == 0:
        for stale in ckdir.glob(".tmp_step_*"):  # left by a save that was killed
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    dist.barrier()
    write_safetensors({f"rank{rank}": torch.get_rng_state()}, tmp / f"rng_rank{rank}.safetensors")
    if rank == 0:
        write_safetensors(_drop_aliases(weights, model), tmp / "model.safetensors")
        write_safetensors(_drop_aliases(moments, model), tmp / "optimizer.safetensors")
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        if cfg.data.tokenizer != "byte":  # self-contained: the tokenizer travels with the checkpoint
            shutil.copyfile(cfg.data.tokenizer, tmp / TOKENIZER_FILE)
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


def check_tensors_match(model, tensors, source: Path) -> None:
    """``tensors``: a dict or ``LazyTensors`` (shapes from its header); ``model`` may be on the meta device."""
    expected = expected_shapes(model)
    shapes = getattr(tensors, "shapes", None) or {k: tuple(v.shape) for k, v in tensors.items()}
    tied = {n for n, p in model.named_parameters(remove_duplicate=False)} - {n for n, _ in model.named_parameters()}
    missing = [k for k in expected if k not in shapes and k not in tied]
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {shapes[k]} vs model {expected[k]}" for k in expected if k in shapes and shapes[k] != expected[k]]
    if missing or unexpected or wrong:
        detail = "; ".join(filter(None, [
            f"missing {missing[:5]}" if missing else "", f"unexpected {unexpected[:5]}" if unexpected else "",
            f"shape mismatch {wrong[:5]}" if wrong else ""]))
        raise CheckpointError(f"'{source}' does not match the model its config describes: {detail}")


def load_tokenizer(path):
    """The tokenizer a checkpoint (or a run directory's latest) was trained with: its own copy of the
    tokenizer file when there is one, the byte tokenizer when its config says so.  Raises CheckpointError."""
    from sparselm.data.tokenizer import load_tokenizer as from_spec

    ckpt = resolve_checkpoint(path)
    data = read_config(ckpt).data
    if (ckpt / TOKENIZER_FILE).is_file():
        return from_spec(str(ckpt / TOKENIZER_FILE), data.eod_token)
    spec = data.tokenizer
    if spec != "byte" and not Path(spec).is_file():
        raise CheckpointError(f"'{ckpt}' holds no {TOKENIZER_FILE} and its data.tokenizer '{spec}' does not exist "
                              "from here; copy the tokenizer file into the checkpoint as tokenizer.json")
    return from_spec(spec, data.eod_token)


def load_model(path):
    """(model, config) on CPU in fp32 from a checkpoint or run directory."""
    from sparselm.model import build_model

    ckpt = resolve_checkpoint(path)
    read_meta(ckpt)
    cfg = read_config(ckpt)
    from sparselm.parallel.materialize import materialize_pieces, tied_aliases

    model = build_model(cfg, device="meta")  # filled from the file tensor by tensor: no random init
    tensors = LazyTensors(ckpt / "model.safetensors", tied_aliases(model))
    check_tensors_match(model, tensors, ckpt / "model.safetensors")
    materialize_pieces(model, tensors, {}, load_buffers=True)
    model.eval()
    return model, cfg
