"""What checkpoint checksums cost: save and load time with and without them, and verify throughput per core.

    python tools/bench_checkpoint.py --checksums --config tiny_moe --model.d_model=1024 --model.n_layers=8 \
        --moe.num_experts=16 --moe.expert_hidden=640 --train.global_batch_size=4

(``bench_checkpoint.py --checksums`` runs ``main`` here.)  One process trains one step and saves ``--repeats``
times each way, in alternating order so that neither side always runs first; each load is a fresh process,
alternating alike:
- ``save``: ``Trainer.save`` with checksums (every file hashed as DCP writes it) against the same save with the
  hash replaced by a no-op (what a save cost before checksums);
- ``resume``: a trainer built from the checkpoint (its construction: the whole checkpoint verified across ranks,
  then read) against the same with the verification skipped;
- ``load_model``: ``sparselm.load_model`` (the whole checkpoint verified, then the model read) against it with
  verification skipped.
Every file is read once before each load, so both sides read from the page cache: the figures are the CPU cost
of hashing, not the extra read a cold file system would add.  Then ``verify`` throughput: the files hashed on
one thread (GB/s per core) and ``tools/convert_checkpoint.py verify`` with 1 and 2 worker processes.
Times are medians over the repeats; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import statistics
import subprocess
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


def _wall_cpu(fn) -> list[float]:
    """[wall seconds, CPU seconds of this process (every thread)] of ``fn()``: on a shared machine the CPU time
    of the hashing shows through the noise that other processes add to the wall time."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return [time.perf_counter() - wall, time.process_time() - cpu]


def _warm(files: list[Path]) -> None:
    """Read every file once so that both sides of a load comparison read from the page cache."""
    for f in files:
        with open(f, "rb", buffering=0) as stream:
            while stream.read(64 << 20):
                pass


def worker(phase: str, on: bool, config: str, overrides: list[str], tmp: Path, repeats: int) -> dict:
    """One measurement in a fresh process (so that what an earlier trainer left in memory does not count)."""
    from sparselm.checkpoint.checkpointing import load_model
    from sparselm.config import load_config
    from sparselm.training.runtime import quiet_third_party
    from sparselm.training.trainer import Trainer

    quiet_third_party()
    base = [*overrides, "--train.progress=false", "--train.tensorboard=false", "--train.eval_every=0",
            "--train.keep_last=0"]
    kept = tmp / "run" / "checkpoints" / "step_1"
    if phase == "save":
        times = {"with": [], "without": []}
        trainer = Trainer(load_config(config, [*base, f"--train.out_dir={tmp / 'run'}"]))
        trainer.train_step(trainer.train_data.batch(trainer._rank_slice(trainer.sampler.next_batch())))
        for r in range(repeats):
            for side in (("with", "without") if r % 2 == 0 else ("without", "with")):
                trainer.step += 1
                with contextlib.nullcontext() if side == "with" else hashing_off():
                    times[side].append(_wall_cpu(trainer.save))
                path = tmp / "run" / "checkpoints" / f"step_{trainer.step}"
                if path != kept:
                    shutil.rmtree(path)
                elif side == "without":
                    sys.exit("bench_checksums: the kept checkpoint must be saved with checksums")
                print(f"save {side} checksums: {times[side][-1][0]:.2f} s", file=sys.stderr)
        trainer.close()
        return times
    with contextlib.nullcontext() if on else verification_off():
        if phase == "resume":
            cfg = load_config(config, [*base, f"--train.out_dir={tmp / f'resumed_{time.time_ns()}'}",
                                       f"--train.resume={kept}"])
            built = []
            took = _wall_cpu(lambda: built.append(Trainer(cfg)))
            built[0].close()
            return {"s": took}
        return {"s": _wall_cpu(lambda: load_model(kept))}


def _run_worker(phase: str, on: bool, config: str, overrides: list[str], tmp: Path, repeats: int) -> dict:
    result = tmp / f"{phase}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--phase", phase, "--on", str(int(on)), "--config", config,
           "--tmp", str(tmp), "--repeats", str(repeats), "--result", str(result), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"bench_checksums: {phase} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(result.read_text())


def main(config: str, overrides: list[str], repeats: int) -> dict:
    from sparselm.checkpoint import integrity
    from tools.convert_checkpoint import main as convert

    times = {k: {"with": [], "without": []} for k in ("resume", "load_model")}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        times["save"] = _run_worker("save", True, config, overrides, tmp, repeats)
        kept = tmp / "run" / "checkpoints" / "step_1"
        files = sorted(f for f in kept.rglob("*") if f.is_file())
        for r in range(repeats):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                for phase in ("resume", "load_model"):
                    _warm(files)
                    times[phase]["with" if on else "without"].append(_run_worker(phase, on, config, overrides, tmp, 1)["s"])
                print(f"loads {'with' if on else 'without'} checksums: resume {times['resume']['with' if on else 'without'][-1]} s, "
                      f"load_model {times['load_model']['with' if on else 'without'][-1]} s (wall, CPU)", file=sys.stderr)
        nbytes = sum(f.stat().st_size for f in files)
        _warm(files)
        one_thread = statistics.median(_timed(lambda: [integrity.file_digest(f) for f in files]) for _ in range(repeats))
        verify_s = {}
        for workers in (1, 2):
            verify_s[workers] = statistics.median(
                _timed(lambda: convert(["verify", "--input", str(kept), "--workers", str(workers)]))
                for _ in range(repeats))
    result = {"ckpt_bytes": nbytes, "files": len(files), "repeats": repeats,
              **{f"{k}_s": {side: statistics.median(w for w, _ in v) for side, v in sides.items()} for k, sides in times.items()},
              **{f"{k}_cpu_s": {side: statistics.median(c for _, c in v) for side, v in sides.items()}
                 for k, sides in times.items()},
              "samples": times,
              "hash_gb_per_s_one_thread": nbytes / one_thread / 1e9,
              "verify_gb_per_s": {str(w): nbytes / s / 1e9 for w, s in verify_s.items()}}
    report(result)
    return result


def report(r: dict) -> None:
    print(f"checkpoint: {r['ckpt_bytes'] / 1e9:.2f} GB in {r['files']} files; medians of {r['repeats']} runs each")
    print(f"{'':12} {'with s':>8} {'without s':>10} {'ratio':>7} | {'CPU with s':>10} {'without s':>10} {'ratio':>7}")
    for k in ("save", "resume", "load_model"):
        w, wo = r[f"{k}_s"]["with"], r[f"{k}_s"]["without"]
        cw, cwo = r[f"{k}_cpu_s"]["with"], r[f"{k}_cpu_s"]["without"]
        print(f"{k:12} {w:8.2f} {wo:10.2f} {w / wo:7.3f} | {cw:10.2f} {cwo:10.2f} {cw / cwo:7.3f}")
    print(f"hashing on one thread: {r['hash_gb_per_s_one_thread']:.2f} GB/s; verify command: "
          + ", ".join(f"{w} worker(s) {v:.2f} GB/s" for w, v in r["verify_gb_per_s"].items()))
    print(json.dumps(r))


if __name__ == "__main__":  # a worker started by main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for flag in ("--phase", "--on", "--config", "--tmp", "--repeats", "--result"):
        parser.add_argument(flag, required=True)
    known, rest = parser.parse_known_args()
    out = worker(known.phase, known.on == "1", known.config, rest, Path(known.tmp), int(known.repeats))
    Path(known.result).write_text(json.dumps(out))
