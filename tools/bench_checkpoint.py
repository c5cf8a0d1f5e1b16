"""Host memory, bytes and time of saving and loading checkpoints per rank, sharded (format 2) against format 1.

    python tools/bench_checkpoint.py --config tiny_moe --layouts 1,dp2,tp2,ep2,pp2 \
        --model.d_model=1024 --model.n_layers=8 --moe.num_experts=16 --moe.expert_hidden=640

With ``--checksums``: save and load time with and without checksums and verify throughput per core instead
(``tools/bench_checksums.py``: one process, ``--repeats`` runs of each).

Each layout is a real multi-process run of the trainer (layouts of 2 processes under the deepspeed launcher,
gloo, CPU), started twice:
1. a fresh start and its first training step (``fresh_peak_gb``: their peak RSS), then a save in format 2 (``save_extra_gb``: peak RSS during the save above the RSS before
   it; ``save_s``; ``bytes_written``: the bytes of the files this rank wrote) and, on the layouts named by
   ``--baseline``, a save the way format 1 did it (every tensor gathered whole to rank 0, which writes alone),
   measured alike (``v1_*``);
2. a resume from the format-2 checkpoint and its first ``--steps`` steps (``load_peak_gb``: their peak RSS;
   ``restore_peak_gb``: the peak of the construction alone, which reads the checkpoint; ``load_s``: its time).
Both runs train ``--steps`` steps (default 2) before their peak is taken: a fresh start allocates the Adam moments
only at the end of its first step, after that step's gradients are freed, so its first step peaks lower than
every later one; from the second step on, a fresh run holds what a resumed one holds from its first (measured:
dp2 of the 302M model, fresh step 1 peaks at 5.2-5.3 GB, step 2 at 5.8-5.9 GB, a resume's steps 1 and 2 at
5.8-5.9 GB).  A fresh run's peak is therefore its second step's, and that is the baseline of ``/fresh``.
Peaks come from /proc/self/status VmHWM, reset at each phase start through /proc/self/clear_refs.  The table
gives, per rank, save_extra against the rank's own bytes and the whole checkpoint, bytes written against
the mean, load peak against the fresh start, and v2 / v1 save time; the last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tools.bench_memory import peak_gb, reset_peak, rss_gb, run_ranks  # noqa: E402

LAYOUTS = {
    "1": (1, []),
    "dp2": (2, []),
    "tp2": (2, ["--parallel.tp=2"]),
    "ep2": (2, ["--parallel.ep=2"]),
    "pp2": (2, ["--parallel.pp=2"]),
}


def _rank_bytes(ckpt: Path, rank: int) -> int:
    """Bytes of the files rank ``rank`` wrote into a format-2 checkpoint (DCP names them shard-<rank + 1>-...)."""
    mine = [f for f in ckpt.rglob(f"shard-{rank + 1:05d}-*.safetensors")] + [ckpt / f"rng_rank{rank}.safetensors"]
    if rank == 0:
        mine += [ckpt / "meta.json", ckpt / "config.yaml"]
    return sum(f.stat().st_size for f in mine if f.is_file())


def save_format1(trainer, path: Path) -> int:
    """Format 1's save, kept here as the baseline: full fp32 weights and moments of every tensor (an all-reduce
    over data-parallel ranks each), gathered whole over tp/ep/pp to global rank 0, which writes them alone.
    Returns the bytes this rank wrote."""
    import torch
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from sparselm.checkpoint.files import write_safetensors
    from sparselm.checkpoint.engine_state import MOMENTS, adam_state, local_tensors, zero_managed, canonical_names_of, link_optimizer_state
    from sparselm.parallel.canonical import gather_full
    from sparselm.parallel.pieces import placements

    engine, model = trainer.engine, trainer.module
    if trainer.ds_config["zero_optimization"].get("stage", 0) == 3:
        raise SystemExit("bench_checkpoint: the format-1 baseline is not defined under ZeRO stage 3 (format 1 never "
                         "ran it: its experts are held in gather chunks it cannot assemble); pass --baseline ''")
    link_optimizer_state(engine)
    names, params, aliases = canonical_names_of(model), dict(model.named_parameters()), getattr(model, "canonical_aliases", {})
    weights, moments, specs = {}, {}, {}
    for local, tensor in local_tensors(model).items():
        canon = names[local]
        specs[canon] = placements(tensor)
        p = params.get(local)
        managed = p is not None and zero_managed(p)
        weights[canon] = (safe_get_full_fp32_param(p) if managed else tensor).detach().float().cpu()
        for key in MOMENTS if p is not None else ():
            value = safe_get_full_optimizer_state(p, key) if managed else adam_state(engine, p).get(key)
            moments[f"{canon}::{key}"], specs[f"{canon}::{key}"] = value.detach().float().cpu(), specs[canon]
    groups = trainer._groups()
    weights = gather_full(weights, specs, groups, trainer.topo.pp_group)
    moments = gather_full(moments, specs, groups, trainer.topo.pp_group)
    written = 0
    path.mkdir(parents=True, exist_ok=True)
    if dist.get_rank() == 0:
        for name, tensors in (("model", weights), ("optimizer", moments)):
            keep = {k: v.contiguous() for k, v in tensors.items() if k.split("::")[0] not in aliases}
            write_safetensors(keep, path / f"{name}.safetensors")
            written += (path / f"{name}.safetensors").stat().st_size
    write_safetensors({f"rank{dist.get_rank()}": torch.get_rng_state()}, path / f"rng_rank{dist.get_rank()}.safetensors")
    dist.barrier()
    return written + (path / f"rng_rank{dist.get_rank()}.safetensors").stat().st_size


def worker(args, overrides: list[str]) -> None:
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    import torch.distributed as dist

    from sparselm.config import load_config
    from sparselm.training.trainer import Trainer

    cfg = load_config(args.config, overrides)
    out = {}
    reset_peak()
    started = time.perf_counter()
    trainer = Trainer(cfg)
    elapsed = time.perf_counter() - started
    rank = dist.get_rank()
    restore_peak = peak_gb()
    for _ in range(args.steps):  # the peak of a run: see the module docstring for why one step is not enough
        trainer.train_step(trainer.train_data.batch(trainer._rank_slice(trainer.sampler.next_batch())))
        trainer.step += 1
    if args.phase == "load":
        out.update(load_peak_gb=peak_gb(), restore_peak_gb=restore_peak, load_s=elapsed)
    else:
        out.update(fresh_peak_gb=peak_gb(), fresh_s=elapsed)
        dist.barrier()
        before = rss_gb()
        reset_peak()
        started = time.perf_counter()
        ckpt = trainer.save()
        out.update(save_s=time.perf_counter() - started, save_extra_gb=peak_gb() - before)
        out["bytes_written"] = _rank_bytes(ckpt, rank)
        out["ckpt_bytes"] = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
        if args.format1:
            dist.barrier()
            before = rss_gb()
            reset_peak()
            started = time.perf_counter()
            out["v1_bytes_written"] = save_format1(trainer, Path(cfg.train.out_dir) / "format1")
            out.update(v1_save_s=time.perf_counter() - started, v1_save_extra_gb=peak_gb() - before)
    Path(f"{args.result}.rank{rank}").write_text(json.dumps(out))
    trainer.close()


def _launch(name: str, phase: str, args, overrides: list[str], tmp: Path, baseline: bool) -> list[dict]:
    procs, layout = LAYOUTS[name]
    result = tmp / f"{name}_{phase}"
    run_dir = tmp / f"run_{name}"
    extra = [f"--train.resume={run_dir / 'checkpoints' / f'step_{args.steps}'}", f"--train.out_dir={tmp / ('resumed_' + name)}"] \
        if phase == "load" else [f"--train.out_dir={run_dir}"]
    script = [str(Path(__file__).resolve()), "--worker", "--phase", phase, "--config", args.config, "--result", str(result),
              f"--steps={args.steps}",
              *(["--format1"] if baseline else []), *overrides, *layout, *extra, "--train.progress=false",
              "--train.tensorboard=false", "--train.eval_every=0"]
    bindir = Path(sys.executable).parent
    port = str(29700 + 2 * list(LAYOUTS).index(name) + (phase == "load"))
    cmd = ([str(bindir / "deepspeed"), "--num_gpus", str(procs), "--master_port", port, *script] if procs > 1
           else [sys.executable, *script])
    return run_ranks(cmd, result, procs, f"layout {name} ({phase})")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--layouts", default="1,dp2,tp2,ep2,pp2")
    parser.add_argument("--baseline", default="1,dp2,tp2,ep2",
                        help="layouts that also save the format-1 way (pp2 is left out by default: format 1 gathers "
                             "every stage's tensors pickled to rank 0, ~3x the checkpoint there)")
    parser.add_argument("--steps", type=int, default=2,
                        help="steps each start trains before its peak is taken (>= 2: see the docstring)")
    parser.add_argument("--checksums", action="store_true",
                        help="measure what checksums cost (save, resume, load_model, verify) instead, in one process")
    parser.add_argument("--repeats", type=int, default=2, help="with --checksums: runs of each measurement (median)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--phase", choices=("save", "load"), help=argparse.SUPPRESS)
    parser.add_argument("--format1", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", type=int, help=argparse.SUPPRESS)  # the deepspeed launcher's
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        return worker(args, overrides)
    if args.checksums:
        from tools.bench_checksums import main as bench_checksums

        return bench_checksums(args.config, overrides, max(1, args.repeats))
    if args.steps < 1:
        sys.exit(f"--steps={args.steps}: give at least 1 (2, the default, measures a run's steady peak)")
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        sys.exit(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")
    baseline = set(args.baseline.split(",")) if args.baseline else set()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            saved = _launch(name, "save", args, overrides, Path(tmp), name in baseline)
            loaded = _launch(name, "load", args, overrides, Path(tmp), False)
            results[name] = [{**s, **l} for s, l in zip(saved, loaded)]
            print(f"measured {name}", file=sys.stderr)
    report(results)


def report(results: dict) -> None:
    print("save_extra: peak RSS during the save above the RSS before it; own: the bytes this rank wrote; "
          "ckpt: the whole checkpoint")
    print(f"{'layout':7} {'rank':>4} {'ckpt GB':>8} {'wrote GB':>8} {'/mean':>6} {'save+GB':>8} {'/own':>6} {'/ckpt':>6} "
          f"{'save s':>7} {'fresh GB':>8} {'restore GB':>10} {'load GB':>8} {'/fresh':>6} {'load s':>7} | {'v1 wrote':>8} {'v1 save+':>8} "
          f"{'v1 s':>6} {'v2/v1 s':>7}")
    for name, ranks in results.items():
        mean = sum(m["bytes_written"] for m in ranks) / len(ranks)
        for r, m in enumerate(ranks):
            gb = 1024**3
            own, ckpt = m["bytes_written"] / gb, m["ckpt_bytes"] / gb
            v1 = (f"{m['v1_bytes_written'] / gb:8.2f} {m['v1_save_extra_gb']:8.2f} {m['v1_save_s']:6.1f} "
                  f"{m['save_s'] / m['v1_save_s']:7.2f}") if "v1_save_s" in m else f"{'-':>8} {'-':>8} {'-':>6} {'-':>7}"
            print(f"{name:7} {r:>4} {ckpt:8.2f} {own:8.2f} {m['bytes_written'] / mean:6.2f} {m['save_extra_gb']:8.2f} "
                  f"{m['save_extra_gb'] / own:6.2f} {m['save_extra_gb'] / ckpt:6.2f} {m['save_s']:7.1f} "
                  f"{m['fresh_peak_gb']:8.2f} {m['restore_peak_gb']:10.2f} {m['load_peak_gb']:8.2f} "
                  f"{m['load_peak_gb'] / m['fresh_peak_gb']:6.2f} "
                  f"{m['load_s']:7.1f} | {v1}")
    keys = ("save_extra_gb", "load_peak_gb", "restore_peak_gb", "fresh_peak_gb", "bytes_written", "v1_save_extra_gb", "v1_bytes_written")
    print(json.dumps({"layouts": {name: {**{k: [m[k] for m in ranks] for k in keys if k in ranks[0]},
                                         "ckpt_bytes": ranks[0]["ckpt_bytes"], "save_s": max(m["save_s"] for m in ranks),
                                         "load_s": max(m["load_s"] for m in ranks),
                                         **({"v1_save_s": max(m["v1_save_s"] for m in ranks)} if "v1_save_s" in ranks[0] else {})}
                                  for name, ranks in results.items()}}))


if __name__ == "__main__":
    main()
