"""What checkpoint checksums cost: save and load time with and without them, and verify throughput per core.

    python tools/bench_checkpoint.py --checksums --config tiny_moe --model.d_model=1024 --model.n_layers=8 \
        --moe.num_experts=16 --moe.expert_hidden=640 --train.global_batch_size=4

(``bench_checkpoint.py --checksums`` runs ``main`` here.)  One process trains one step, then, ``--repeats`` times
in alternating order so that neither side always runs first, measures in the same process:
- ``save``: ``Trainer.save`` with checksums (every file hashed as DCP writes it) against the same save with the
  hash replaced by a no-op (what a save cost before checksums);
- ``resume``: a trainer built from the checkpoint (its construction: the whole checkpoint verified across ranks,
  then read) against the same with the verification skipped;
- ``load_model``: ``sparselm.load_model`` (the whole checkpoint verified, then the model read) against it with
  verification skipped.
The checkpoint was just written, so every load reads from the page cache: the figures are the CPU cost of
hashing, not the extra disk read a cold file system would add.  Then ``verify`` throughput: the files hashed on
one thread (GB/s per core) and ``tools/convert_checkpoint.py verify`` with 1 and 2 worker processes.
Times are medians over the repeats; the last line is one JSON object.
"""
from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


class _NoHash:
    """Stands in for ``xxhash.xxh3_64`` in the baseline: updates do nothing."""

    def __init__(self, data=b""):
        pass

    def update(self, data) -> None:
        pass

    def hexdigest(self) -> str:
        return "0" * 16


@contextlib.contextmanager
def hashing_off():
    """Saves that hash nothing (xxh3-64 replaced by a no-op): what a save cost before checksums."""
    from sparselm.checkpoint import integrity

    saved, integrity.xxhash = integrity.xxhash, SimpleNamespace(xxh3_64=_NoHash)
    try:
        yield
    finally:
        integrity.xxhash = saved


@contextlib.contextmanager
def verification_off():
    """Loads that verify no file (meta.json's own checksum and the small config and RNG files aside, read in the
    same pass anyway): what a load cost before checksums."""
    from sparselm.checkpoint import checkpointing, integrity

    saved = (checkpointing.verify_collectively, checkpointing.verify_checkpoint, integrity.Checksums.verify,
             integrity.Checksums.verify_header)
    checkpointing.verify_collectively = lambda ckpt, group=None: []
    checkpointing.verify_checkpoint = lambda ckpt: None
    integrity.Checksums.verify = integrity.Checksums.verify_header = lambda self, rel: None
    try:
        yield
    finally:
        (checkpointing.verify_collectively, checkpointing.verify_checkpoint, integrity.Checksums.verify,
         integrity.Checksums.verify_header) = saved


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main(config: str, overrides: list[str], repeats: int) -> dict:
    from sparselm.checkpoint import integrity
    from sparselm.checkpoint.checkpointing import load_model
    from sparselm.config import load_config
    from sparselm.training.runtime import quiet_third_party
    from sparselm.training.trainer import Trainer
    from tools.convert_checkpoint import main as convert

    quiet_third_party()
    base = [*overrides, "--train.progress=false", "--train.tensorboard=false", "--train.eval_every=0",
            "--train.keep_last=0"]
    times = {k: {"with": [], "without": []} for k in ("save", "resume", "load_model")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        trainer = Trainer(load_config(config, [*base, f"--train.out_dir={tmp / 'run'}"]))
        trainer.train_step(trainer.train_data.batch(trainer._rank_slice(trainer.sampler.next_batch())))
        kept = None
        for r in range(repeats):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                trainer.step += 1
                with contextlib.nullcontext() if on else hashing_off():
                    started = time.perf_counter()
                    path = trainer.save()
                    times["save"]["with" if on else "without"].append(time.perf_counter() - started)
                if on and kept is None:
                    kept = path
                else:
                    shutil.rmtree(path)
                print(f"save {'with' if on else 'without'} checksums: {times['save']['with' if on else 'without'][-1]:.2f} s",
                      file=sys.stderr)
        trainer.close()
        for r in range(repeats):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                integrity.forget_verified()
                out = tmp / f"resumed_{r}_{on}"
                cfg = load_config(config, [*base, f"--train.out_dir={out}", f"--train.resume={kept}"])
                with contextlib.nullcontext() if on else verification_off():
                    started = time.perf_counter()
                    resumed = Trainer(cfg)
                    times["resume"]["with" if on else "without"].append(time.perf_counter() - started)
                    resumed.close()
                    integrity.forget_verified()
                    times["load_model"]["with" if on else "without"].append(_timed(lambda: load_model(kept)))
                shutil.rmtree(out, ignore_errors=True)
                print(f"loads {'with' if on else 'without'} checksums: resume {times['resume']['with' if on else 'without'][-1]:.2f} s, "
                      f"load_model {times['load_model']['with' if on else 'without'][-1]:.2f} s", file=sys.stderr)
        files = sorted(f for f in kept.rglob("*") if f.is_file())
        nbytes = sum(f.stat().st_size for f in files)
        one_thread = statistics.median(_timed(lambda: [integrity.file_digest(f) for f in files]) for _ in range(repeats))
        verify_s = {}
        for workers in (1, 2):
            verify_s[workers] = statistics.median(
                _timed(lambda: convert(["verify", "--input", str(kept), "--workers", str(workers)]))
                for _ in range(repeats))
    result = {"ckpt_bytes": nbytes, "files": len(files), "repeats": repeats,
              **{f"{k}_s": {side: statistics.median(v) for side, v in sides.items()} for k, sides in times.items()},
              "hash_gb_per_s_one_thread": nbytes / one_thread / 1e9,
              "verify_gb_per_s": {str(w): nbytes / s / 1e9 for w, s in verify_s.items()}}
    report(result)
    return result


def report(r: dict) -> None:
    print(f"checkpoint: {r['ckpt_bytes'] / 1e9:.2f} GB in {r['files']} files; medians of {r['repeats']} runs each")
    print(f"{'':12} {'with s':>8} {'without s':>10} {'ratio':>7}")
    for k in ("save", "resume", "load_model"):
        w, wo = r[f"{k}_s"]["with"], r[f"{k}_s"]["without"]
        print(f"{k:12} {w:8.2f} {wo:10.2f} {w / wo:7.3f}")
    print(f"hashing on one thread: {r['hash_gb_per_s_one_thread']:.2f} GB/s; verify command: "
          + ", ".join(f"{w} worker(s) {v:.2f} GB/s" for w, v in r["verify_gb_per_s"].items()))
    print(json.dumps(r))
