"""Canonical, layout-free checkpoints, written and read in shards by every rank (format 2).

``checkpoints/step_<N>/`` holds
- ``model/``: every model tensor (the fp32 master weights, persistent buffers) under its canonical name (the
  ``state_dict()`` name of the one-process model), as boxes of the canonical tensor in safetensors files,
  each rank writing what it owns (``sparselm.checkpoint.shards``, on torch.distributed.checkpoint);
- ``optimizer/``: the Adam moments (``NAME::exp_avg``, ``NAME::exp_avg_sq``) alike, each rank writing its ZeRO
  partition;
- ``rng_rank<R>.safetensors``: each rank's RNG states, CPU and CUDA (used when resuming on the same layout);
- ``meta.json``: step, sampler position, layout saved from, versions, optimizer step, every tensor's shape,
  every file with its size (checked before a load) and its checksum (``sparselm.checkpoint.integrity``:
  computed by the writing rank as it writes, verified by every rank that reads), sealed by a checksum of its
  own text;
- ``config.yaml``: the resolved config, and ``tokenizer.json`` for a trained tokenizer.

Any layout reads any checkpoint: each rank reads just the boxes its own pieces need.  A checkpoint is
written to ``.tmp_step_<N>``, ``meta.json`` last, renamed into place, then ``checkpoints/latest`` is
replaced, so a crash at any moment leaves the previous checkpoint loadable.  Nothing is unpickled on load:
tensors are safetensors (their chunk offsets JSON in the header), the rest JSON/YAML.  Format 1 (one
``model.safetensors`` and ``optimizer.safetensors`` written by rank 0) still loads.
"""
from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from safetensors import SafetensorError

import sparselm
from sparselm.checkpoint.engine_state import optimizer_step_count, state_boxes
from sparselm.checkpoint.files import read_tensors, write_safetensors
from sparselm.checkpoint.integrity import (
    Checksums,
    checkpoint_problems,
    copy_file,
    earlier_checkpoints,
    earlier_line,
    manifest,
    newest_verifying,
    seal,
    unseal,
    write_bytes,
)
from sparselm.checkpoint.shards import ShardReader, save_boxes
from sparselm.checkpoint.tensors import CanonicalTensors
from sparselm.config import ConfigError, config_from_dict, to_yaml
from sparselm.data.tokenizer import load_tokenizer as from_spec
from sparselm.errors import CheckpointError, SaveError
from sparselm.model import build_model
from sparselm.parallel.materialize import materialize_pieces, tied_aliases

FORMAT = "sparselm-checkpoint"
TOKENIZER_FILE = "tokenizer.json"
VERSION = 2
MODEL_DIR, OPTIMIZER_DIR = "model", "optimizer"


# ---------------------------------------------------------------------------------------------
# locating
def checkpoints_dir(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def _complete(path: Path) -> bool:
    return (path / "meta.json").is_file()  # written last


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The checkpoint ``checkpoints/latest`` names; should it name none that is complete (a crash while a
    checkpoint of the same step was replaced), the newest complete one, the one being replaced included."""
    ckdir = checkpoints_dir(out_dir)
    pointer = ckdir / "latest"
    if not pointer.is_file():
        return None
    path = ckdir / pointer.read_text().strip()
    if _complete(path):
        return path
    found = [p for p in list(ckdir.glob("step_*")) + list(ckdir.glob(".old_step_*")) if _complete(p)]
    return max(found, key=lambda p: (int(p.name.rsplit("_", 1)[1]), not p.name.startswith(".")), default=None)


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
    """meta.json, its own checksum verified (``integrity.unseal``).  Raises CheckpointError naming the file."""
    try:
        meta = unseal(ckpt / "meta.json", (ckpt / "meta.json").read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"'{ckpt / 'meta.json'}' is unreadable ({err}); the checkpoint is damaged, use an earlier one") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"'{ckpt}' is not a sparselm checkpoint (meta.json format={meta.get('format')!r})")
    return meta


class LazyTensors(CanonicalTensors):
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

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self._file.get_tensor(self.stored(name))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"tensor '{name}' of '{self.path}' cannot be read ({err}); use an earlier checkpoint") from None

    def dtype(self, name: str) -> torch.dtype:
        from safetensors.torch import _getdtype

        return _getdtype(self._file.get_slice(self.stored(name)).get_dtype())

    def rows(self, name: str, first: int, count: int) -> torch.Tensor:
        """Rows [first, first + count) along dim 0 only (only their bytes are read)."""
        try:
            return self._file.get_slice(self.stored(name))[first:first + count]
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"tensor '{name}' of '{self.path}' cannot be read ({err}); use an earlier checkpoint") from None


def read_config(ckpt: Path):
    """The checkpoint's config.yaml, verified against its checksum as it is read."""
    sums = Checksums(ckpt, read_meta(ckpt))
    try:
        return config_from_dict(yaml.safe_load(sums.read("config.yaml").decode()))
    except (OSError, UnicodeDecodeError, yaml.YAMLError, ConfigError) as err:
        raise CheckpointError(f"'{ckpt / 'config.yaml'}' cannot be read as a sparselm config: {err}") from None


def rng_state() -> dict[str, torch.Tensor]:
    """This process's RNG states: CPU, and the current CUDA device's when there is one."""
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    cpu = states.get("cpu", next((v for k, v in states.items() if k.startswith("rank")), None))  # format 1: "rank<R>"
    if cpu is not None:
        torch.set_rng_state(cpu)
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])


def publish(ckdir: Path, tmp: Path, final: Path, keep_last: int) -> None:
    """Move a complete ``tmp`` to ``final``, then ``latest``; a checkpoint of the same step is set aside first
    and removed last, so ``latest_checkpoint`` finds a complete checkpoint at every moment."""
    old = ckdir / f".old_{final.name}"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
    os.rename(tmp, final)
    pointer_tmp = ckdir / ".latest.tmp"
    pointer_tmp.write_text(final.name + "\n")
    os.replace(pointer_tmp, ckdir / "latest")
    shutil.rmtree(old, ignore_errors=True)
    _prune(ckdir, keep_last, final)


def clean_stale(ckdir: Path) -> None:
    """What a killed save left: partial ``.tmp_step_*`` directories go; a set-aside ``.old_step_N`` whose
    replacement never arrived goes back to ``step_N``."""
    for stale in ckdir.glob(".tmp_step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in ckdir.glob(".old_step_*"):
        final = ckdir / old.name[len(".old_"):]
        if _complete(final):
            shutil.rmtree(old, ignore_errors=True)
        elif not final.exists():
            os.rename(old, final)


class CheckpointWriter:
    """Saves the checkpoints of one run; every rank holds one and calls ``save`` together.

    Every rank writes its own pieces (``engine_state.state_boxes``: its ZeRO partition of the fp32 master
    weights and Adam moments, no gather) through torch.distributed.checkpoint; global rank 0 then writes
    ``meta.json`` and publishes the directory.  With ``async_save`` the pieces are copied to host memory and
    written on a background thread over a process group of its own while training goes on; ``latest`` moves
    when the write is complete, and the next ``save`` (or ``wait``) waits for it."""

    def __init__(self, out_dir, keep_last: int, async_save: bool = False):
        self.ckdir, self.keep_last = checkpoints_dir(out_dir), keep_last
        self._pending = None
        self._group = dist.new_group(backend="gloo") if async_save else None  # collective: every rank builds it
        self._executor = None
        if async_save:
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="sparselm-save")

    def save(self, step: int, engine, model, cfg, sampler_state: dict, layout: dict, groups: dict) -> Path:
        """Write checkpoint ``step`` (collective).  Raises SaveError on every rank when any rank could not write
        its part (the partial ``.tmp_step_<N>`` is removed, ``latest`` and earlier checkpoints stay)."""
        self.wait()
        rank = dist.get_rank()
        final, tmp = self.ckdir / f"step_{step}", self.ckdir / f".tmp_step_{step}"
        weights, moments = state_boxes(engine, model, groups)
        needed = _bytes_needed(weights, moments)
        failure = None
        entries = {}  # relative path -> checksum entry of each file this rank writes, computed as it writes
        if rank == 0:
            try:
                self.ckdir.mkdir(parents=True, exist_ok=True)
                clean_stale(self.ckdir)
                _warn_if_short(self.ckdir, needed, final.name)
                tmp.mkdir()
                entries["config.yaml"] = write_bytes(tmp / "config.yaml", to_yaml(cfg).encode())
                if cfg.data.tokenizer != "byte":  # self-contained: the tokenizer travels with the checkpoint
                    entries[TOKENIZER_FILE] = copy_file(Path(cfg.data.tokenizer), tmp / TOKENIZER_FILE)
            except OSError as err:
                failure = err
        self._check(_agree(failure), tmp, needed)  # also the barrier: tmp exists for every rank from here
        try:
            rng_file = f"rng_rank{rank}.safetensors"
            entries[rng_file] = write_safetensors(rng_state(), tmp / rng_file)
        except OSError as err:
            failure = err
        self._check(_agree(failure), tmp, needed)
        meta = {"format": FORMAT, "version": VERSION, "step": step, "optimizer_step": optimizer_step_count(engine),
                "sampler": sampler_state, "layout": layout, "world_size": dist.get_world_size(), "versions": library_versions()}
        if self._executor is None:
            self._write(tmp, final, weights, moments, meta, needed, entries)  # every rank returns with it published
        else:
            staged = [{n: (shape, [(off, t.detach().to("cpu", copy=True)) for off, t in boxes])
                       for n, (shape, boxes) in part.items()} for part in (weights, moments)]
            self._pending = self._executor.submit(self._write, tmp, final, *staged, meta, needed, entries)
        return final

    def _write(self, tmp: Path, final: Path, weights, moments, meta: dict, needed: int, entries: dict) -> None:
        from torch.distributed.checkpoint.api import CheckpointException

        failure = None
        try:
            written, model_files = save_boxes(weights, tmp / MODEL_DIR, self._group)
            _, optimizer_files = save_boxes(moments, tmp / OPTIMIZER_DIR, self._group)
            entries.update({f"{MODEL_DIR}/{k}": v for k, v in model_files.items()})
            entries.update({f"{OPTIMIZER_DIR}/{k}": v for k, v in optimizer_files.items()})
        except CheckpointException as err:  # raised on every rank when any rank failed
            failure = _cause(err)
        every = _gather(entries, self._group)  # rank 0 records every rank's checksums
        if failure is None and dist.get_rank() == 0:  # DCP's coordinator returns once every rank has written
            try:
                meta["tensors"] = {n: list(md.size) for n, md in sorted(written.state_dict_metadata.items())}
                failure = _record_files(meta, tmp, every)
                if failure is None:
                    (tmp / "meta.json").write_text(seal(meta))
                    publish(self.ckdir, tmp, final, self.keep_last)
            except OSError as err:
                failure = err
        self._check(_agree(failure, self._group), tmp, needed)

    def _check(self, failure: str | None, tmp: Path, needed: int) -> None:
        """Raise SaveError (on every rank: ``failure`` was agreed) after rank 0 removed the partial ``tmp``."""
        if failure is None:
            return
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        latest = latest_checkpoint(self.ckdir.parent)
        raise SaveError(f"saving {tmp} failed: {failure}; the checkpoint needs up to {_gb(needed)} and the "
                        f"filesystem has {_gb(_free_bytes(self.ckdir))} free. The partial {tmp.name} was removed and "
                        f"latest still names {latest.name if latest else 'no checkpoint'}: free space (or fix the "
                        "permission or quota) and rerun with --train.resume=latest, or point train.out_dir elsewhere")

    def wait(self) -> None:
        """Block until the save in flight (if any) is published; re-raises its error (SaveError on every rank)."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def close(self) -> None:
        self.wait()
        if self._executor is not None:
            self._executor.shutdown()


def _bytes_needed(*parts) -> int:
    """Bytes of every rank's pieces (summed over ranks: an upper bound, as replicas are written once)."""
    total = torch.tensor([sum(t.numel() * t.element_size() for part in parts for _, boxes in part.values()
                              for _, t in boxes)], dtype=torch.float64)
    if dist.get_world_size() > 1:
        dist.all_reduce(total)
    return int(total.item())


def _free_bytes(path: Path) -> int:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


def _warn_if_short(ckdir: Path, needed: int, name: str) -> None:
    free = _free_bytes(ckdir)
    if needed > free:
        print(f"sparselm: warning: checkpoint {name} needs up to {_gb(needed)} but {ckdir} has {_gb(free)} free; "
              "the save will likely fail", flush=True)


def _cause(err: BaseException) -> str:
    """One line for what DCP raised: the first OSError any rank met (else its first failure)."""
    failures = [exc for exc, _ in getattr(err, "failures", {}).values()] or [err]
    for exc in failures:
        seen = exc
        while seen is not None:
            if isinstance(seen, OSError):
                return f"{type(seen).__name__}: {seen}"
            seen = seen.__cause__ or seen.__context__
    first = failures[0]
    return f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''}"


def _gather(entries: dict, group=None) -> dict:
    """Collective over ``group``: every rank's checksum entries in one dict (relative path -> entry)."""
    if dist.get_world_size(group) == 1:
        return dict(entries)
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, entries, group=group)
    return {k: v for part in every for k, v in part.items()}


def _record_files(meta: dict, tmp: Path, entries: dict) -> str | None:
    """meta.json's ``files`` (sizes) and ``checksums`` from the writers' entries; a file under ``tmp`` that no
    writer recorded (or one recorded but absent) fails the save: a checkpoint is complete only with every
    checksum recorded."""
    on_disk = {str(f.relative_to(tmp)) for f in tmp.rglob("*") if f.is_file()}
    if on_disk != set(entries):
        return (f"the files written ({sorted(on_disk ^ set(entries))[:3]}...) differ from those whose checksums "
                "were recorded; this is a bug in sparselm's checkpoint writer")
    meta["files"] = {k: entries[k]["bytes"] for k in sorted(entries)}
    meta["checksums"] = manifest(entries)
    return None


def _agree(failure, group=None) -> str | None:
    """Collective over ``group``: the first failure any rank met (a message), or None when none failed."""
    mine = None if failure is None else (failure if isinstance(failure, str) else f"{type(failure).__name__}: {failure}")
    if dist.get_world_size(group) == 1:
        return mine
    every = [None] * dist.get_world_size(group)
    dist.all_gather_object(every, mine, group=group)
    return next((f for f in every if f is not None), None)


def _prune(ckdir: Path, keep_last: int, newest: Path) -> None:
    """Remove all but the ``keep_last`` newest step directories.  ``newest`` (just published) is never removed:
    its checksums are those of the bytes just written, so the newest checkpoint that verifies always stays."""
    if keep_last <= 0:
        return
    steps = sorted((p for p in ckdir.glob("step_*") if p.is_dir()), key=lambda p: int(p.name.split("_")[1]))
    for old in steps[:-keep_last]:
        if old != newest:
            shutil.rmtree(old, ignore_errors=True)


def library_versions() -> dict:
    """Versions of sparselm, torch, deepspeed and megatron-core (meta.json's ``versions``); the imports are
    deferred: deepspeed and megatron take seconds to import, and only a save needs them."""
    import deepspeed
    import megatron.core

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
    ckpt = resolve_checkpoint(path)
    data = read_config(ckpt).data
    if (ckpt / TOKENIZER_FILE).is_file():
        Checksums(ckpt, read_meta(ckpt)).verify(TOKENIZER_FILE)
        return from_spec(str(ckpt / TOKENIZER_FILE), data.eod_token)
    spec = data.tokenizer
    if spec != "byte" and not Path(spec).is_file():
        raise CheckpointError(f"'{ckpt}' holds no {TOKENIZER_FILE} and its data.tokenizer '{spec}' does not exist "
                              "from here; copy the tokenizer file into the checkpoint as tokenizer.json")
    return from_spec(spec, data.eod_token)


def verify_files(ckpt: Path, meta: dict) -> None:
    """Every file ``meta.json`` lists is there with the size it was written with (format 2); raises
    CheckpointError naming the first that is not, before anything is read."""
    for name, size in meta.get("files", {}).items():
        path = ckpt / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file '{path}' is missing; the checkpoint is incomplete, use an earlier one")
        if path.stat().st_size != size:
            raise CheckpointError(f"checkpoint file '{path}' has {path.stat().st_size} bytes, {size} when written: it is "
                                  "truncated or damaged; use an earlier checkpoint")


def open_model_tensors(ckpt: Path, meta: dict, verify: bool = True):
    """The model tensors of a checkpoint, read on demand: a ``ShardReader`` (format 2) or ``LazyTensors``
    (format 1).  Checks the files first, and that they hold the tensors and shapes ``meta.json`` recorded;
    ``verify``: each file's checksum is verified as it is read (False: ``verify_collectively`` already did)."""
    sums = Checksums(ckpt, meta)
    if meta.get("version", 1) < 2:
        return LazyTensors(ckpt / "model.safetensors")

    verify_files(ckpt, meta)
    reader = ShardReader(ckpt / MODEL_DIR, sums=sums if verify else None)
    recorded = {k: tuple(v) for k, v in meta.get("tensors", {}).items()}
    if recorded and recorded != reader.shapes:
        differ = sorted(set(recorded.items()) ^ set(reader.shapes.items()))[:3]
        raise CheckpointError(f"the files under '{ckpt / MODEL_DIR}' do not match its meta.json ({differ}); the "
                              "checkpoint is damaged, use an earlier one")
    return reader


def open_optimizer_tensors(ckpt: Path, meta: dict, verify: bool = True):
    """The Adam moments of a checkpoint, like ``open_model_tensors``; None when it holds none (a converted model)."""
    if meta.get("version", 1) < 2:
        moments = LazyTensors(ckpt / "optimizer.safetensors")
        return moments if len(moments) else None

    if not (ckpt / OPTIMIZER_DIR).is_dir():
        return None
    moments = ShardReader(ckpt / OPTIMIZER_DIR, sums=Checksums(ckpt, meta) if verify else None)
    return moments if len(moments) else None


def verify_checkpoint(ckpt: Path) -> None:
    """Every file of ``ckpt`` against the size and checksum meta.json recorded (hashed here, once per process);
    raises CheckpointError with the first problem, how many more, and the newest earlier checkpoint that verifies."""
    problems = checkpoint_problems(ckpt)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(f"{problems[0]}{more}{earlier_line(newest_verifying(ckpt))}")


def load_model(path):
    """(model, config) on CPU in fp32 from a checkpoint or run directory.  The whole checkpoint is verified first
    (``verify_checkpoint``: the optimizer and RNG files too, though only the model is read), so a damaged file is
    named here rather than found by a later resume."""
    ckpt = resolve_checkpoint(path)
    meta = read_meta(ckpt)
    verify_checkpoint(ckpt)
    cfg = read_config(ckpt)

    model = build_model(cfg, device="meta")  # filled from the files tensor by tensor: no random init
    tensors = open_model_tensors(ckpt, meta)
    tensors.aliases = tied_aliases(model)
    check_tensors_match(model, tensors, ckpt)
    materialize_pieces(model, tensors, {}, load_buffers=True)
    model.eval()
    return model, cfg


def read_rng(ckpt: Path, meta: dict, rank: int, verify: bool = True) -> dict[str, torch.Tensor] | None:
    """Rank ``rank``'s RNG states saved in ``ckpt`` (verified as read unless ``verify`` is False); None without a file."""
    path = ckpt / f"rng_rank{rank}.safetensors"
    if not path.is_file():
        return None
    return read_tensors(path, Checksums(ckpt, meta) if verify else None)


def _verifier(name: str, world: int) -> int:
    """The rank that verifies file ``name`` in ``verify_collectively``: the rank that wrote it in a checkpoint of
    the same world size (which is the rank that reads it on a resume in the same layout, so its node's page
    cache then serves the read); the others spread by name."""
    base = Path(name).name
    if base.startswith("shard-"):
        return (int(base.split("-")[1]) - 1) % world
    if base.startswith("rng_rank"):
        return int(base[len("rng_rank"):].split(".")[0]) % world
    return sum(base.encode()) % world


def verify_collectively(ckpt: Path, group=None) -> list[str]:
    """Collective over ``group`` (default: the world): every file of checkpoint ``ckpt`` is hashed by one rank
    (``_verifier``), in parallel; returns every problem found by any rank (one line each, the same list on every
    rank), empty when the whole checkpoint verifies."""
    world = dist.get_world_size(group) if dist.is_initialized() else 1
    me = dist.get_rank(group) if dist.is_initialized() else 0
    try:
        names = sorted(read_meta(ckpt).get("files", {}))
        mine = [n for n in names if _verifier(n, world) == me]
        problems = checkpoint_problems(ckpt, mine)
    except CheckpointError as err:
        problems = [str(err)]
    if world == 1:
        return problems
    every = [None] * world
    dist.all_gather_object(every, problems, group=group)
    return list(dict.fromkeys(p for part in every for p in part))


def resume_candidates(ckpt: Path) -> list[Path]:
    """``ckpt`` and the complete checkpoints of its run older than it, newest first (a fallback's order)."""
    return [ckpt, *earlier_checkpoints(ckpt)]
