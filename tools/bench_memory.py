"""Host memory per rank, by phase, under several parallel layouts: what sharded construction buys.

    python tools/bench_memory.py --config tiny_moe --layouts 1,tp2,pp2,ep2,tp2xep2 \
        --model.d_model=1024 --model.n_layers=8 --moe.num_experts=16 --moe.expert_hidden=640

Each layout is a real multi-process run (torchrun, gloo, CPU) of the trainer's own construction steps;
every rank reports, from /proc/self/status (peak reset between phases through /proc/self/clear_refs):
- ``params_local``: parameters this rank holds (its pieces: TP slices, its experts, its stage's layers);
- ``params_reachable``: parameters with memory reachable from the trained module (modules, lists,
  dicts and DeepSpeed layer specs it refers to), i.e. what the module keeps alive;
- ``baseline_gb``: RSS after imports, process groups and data (before the model);
- ``build_peak_gb``: peak RSS while the model is constructed (meta model, parallelisation, materialisation);
- ``engine_peak_gb``: peak RSS while ``deepspeed.initialize`` builds the engine and optimizer;
- ``step_peak_gb``: peak RSS over the training steps; ``step_s``: median seconds per step after the first.
Layouts: ``1``, ``dp2``, ``tp2``, ``pp2``, ``ep2`` (with dp 2), ``tp2xep2`` (4 processes), ``tp2rows`` (tp2 with
``parallel.moe_tp_mode=rows``, the baseline expert tensor parallelism is measured against).  Under ZeRO
stage 3 (``--parallel.ds_config=zero3``) a parameter counts with its partition (``ds_tensor``), so ``dp2``
shows what partition-at-materialise (``sparselm.parallel.zero3``) holds while building.
The table gives ratios against layout ``1`` measured in the same run; the last line is one JSON object.

Activation memory under recomputation (``--recompute none,full,selective``): each layout runs once per
``parallel.recompute`` mode, and every rank also reports
- ``saved_gb``: the most activation bytes held for backward at once over the steps (one micro-batch outside
  pipelines): tensors autograd saves (``torch.autograd.graph.saved_tensors_hooks``; parameters excluded,
  each storage once) plus the matmul outputs selective recomputation caches (``recompute.kept_observer``);
- ``plan_gb``: ``sparselm.plan``'s activation figure of the rank for that mode (kept per micro-batch);
- ``step_peak_above_gb``: a step's peak RSS above the RSS it started from (the largest after the first step);
side by side with ratios against ``none`` of the same layout: saved bytes, step peak above baseline, step time.

    python tools/bench_memory.py --config tiny_moe --layouts 1 --recompute none,full,selective ...
"""
from __future__ import annotations

import argparse
import json
import os
import weakref
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAYOUTS = {
    "1": (1, []),
    "dp2": (2, []),
    "tp2": (2, ["--parallel.tp=2"]),
    "tp2rows": (2, ["--parallel.tp=2", "--parallel.moe_tp_mode=rows"]),
    "pp2": (2, ["--parallel.pp=2"]),
    "ep2": (2, ["--parallel.ep=2"]),
    "tp2xep2": (4, ["--parallel.tp=2", "--parallel.ep=2"]),
}
GB = 1024**3


# ------------------------------------------------------------------------------------------ measuring
def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def rss_gb() -> float:
    return _status_kb("VmRSS") * 1024 / GB


def peak_gb() -> float:
    return _status_kb("VmHWM") * 1024 / GB


def reset_peak() -> None:
    """VmHWM back to the current RSS (Linux >= 4.0: '5' to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


class SavedBytes:
    """Bytes of activation storages held for backward now, and the most at once (``peak``).  ``hold(t)`` counts
    ``t``'s storage (once however many tensors view it) until the returned object, or ``t`` with
    ``owner=t``, is freed; storages of ``excluded`` data pointers (the parameters) are not counted."""

    def __init__(self, excluded: set):
        self.excluded, self.live, self.now, self.peak = excluded, {}, 0, 0

    def hold(self, t, owner=None):
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self.excluded or storage.nbytes() == 0 or t.device.type == "meta":
            return t
        if key in self.live:
            self.live[key][1] += 1
        else:
            self.live[key] = [storage.nbytes(), 1]
            self.now += storage.nbytes()
            self.peak = max(self.peak, self.now)
        token = owner if owner is not None else _Held(t)
        weakref.finalize(token, self._release, key)
        return token

    def _release(self, key):
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            del self.live[key]
            self.now -= entry[0]


class _Held:
    def __init__(self, t):
        self.t = t


def worker(args, overrides: list[str]) -> None:
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    import torch

    from sparselm.config import load_config
    from sparselm.training.optim import lr_at, set_lr
    from sparselm.parallel.materialize import reachable_parameters
    from sparselm.training.nonfinite import NonFiniteGuard
    from sparselm.training.trainer import Trainer

    cfg = load_config(args.config, overrides)
    t = Trainer.__new__(Trainer)
    t.cfg = cfg
    t._start_processes()
    t._open_data()
    out = {"baseline_gb": rss_gb()}
    reset_peak()
    t._build_module(None)
    out["build_peak_gb"] = peak_gb()
    out["params_local"] = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                              for p in {id(p): p for p in t.module.parameters()}.values())
    out["params_reachable"] = reachable_parameters(t.module)
    out["params_total"] = t.num_params[0]
    reset_peak()
    t.nonfinite = NonFiniteGuard(cfg.train.max_skipped_steps, fp16=t.ds_config.get("fp16", {}).get("enabled", False))
    t._build_engine()
    out["engine_peak_gb"] = peak_gb()
    from sparselm.parallel import recompute

    saved = SavedBytes({p.untyped_storage().data_ptr() for p in t.engine.module.parameters()})
    recompute.kept_observer = lambda kept: saved.hold(kept, owner=kept)
    times, peaks, above = [], [], []
    t.step = 0  # train_step keys layout-free gating noise by the step
    for step in range(args.steps):
        set_lr(t.engine.optimizer, lr_at(step, cfg.optim, cfg.train.steps))
        batch = t.train_data.batch(t._rank_slice(t.sampler.next_batch()))
        before = rss_gb()
        reset_peak()
        started = time.perf_counter()
        with torch.autograd.graph.saved_tensors_hooks(saved.hold, lambda held: held.t if isinstance(held, _Held) else held):
            t.train_step(batch)
        times.append(time.perf_counter() - started)
        peaks.append(peak_gb())
        above.append(peaks[-1] - before)
        t.step += 1
    out["step_peak_gb"] = max(peaks)
    # the step's own peak above the RSS it started from, after the first (which also allocates Adam's moments)
    out["step_peak_above_gb"] = max(above[1:] or above)
    out["saved_gb"] = saved.peak / GB
    out["plan_gb"] = planned_activations_gb(cfg, torch.distributed.get_world_size(), torch.distributed.get_rank())
    later = sorted(times[1:] or times)
    out["step_s"] = later[len(later) // 2]
    Path(f"{args.result}.rank{torch.distributed.get_rank()}").write_text(json.dumps(out))
    torch.distributed.barrier()


def planned_activations_gb(cfg, world: int, rank: int) -> float:
    """sparselm.planning.planner's activations kept per micro-batch on ``rank`` under cfg's parallel.recompute (CPU ranks)."""
    from sparselm.planning.planner import plan_layout

    mode = cfg.parallel.recompute
    acts = plan_layout(cfg, world, gpu_mem_gb=1e6, device="cpu").ranks[rank].activations
    return acts["per_micro_batch" if mode == "none" else f"per_micro_batch_{mode}"] / GB


# ------------------------------------------------------------------------------------------ driving
def run_layout(name: str, args, overrides: list[str], tmp: Path, mode: str | None = None) -> list[dict]:
    procs, layout = LAYOUTS[name]
    if mode is not None:
        layout, name = layout + [f"--parallel.recompute={mode}"], f"{name}-{mode}"
    result = tmp / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), "--master_port",
           str(29600 + list(LAYOUTS).index(name.split("-")[0])), str(Path(__file__).resolve()), "--worker", "--config", args.config,
           "--result", str(result), "--steps", str(args.steps), *overrides, *layout,
           f"--train.out_dir={tmp / ('run_' + name)}", "--train.progress=false", "--train.tensorboard=false"]
    return run_ranks(cmd, result, procs, f"layout {name}")


def run_ranks(cmd: list[str], result: Path, procs: int, what: str) -> list[dict]:
    """Run one multi-process measurement and return each rank's JSON report (``{result}.rank<R>``); exits
    naming ``what`` with the tail of its stderr when it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{what} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return [json.loads(Path(f"{result}.rank{r}").read_text()) for r in range(procs)]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--layouts", default="1,tp2,pp2,ep2")
    parser.add_argument("--steps", type=int, default=3, help="training steps measured per layout")
    parser.add_argument("--recompute", default="", help="comma-separated parallel.recompute modes to measure each "
                        "layout under (none,full,selective), reported side by side")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        return worker(args, overrides)
    names = args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        sys.exit(f"unknown layout(s) {unknown}; choose from {', '.join(LAYOUTS)}")
    if args.recompute:
        return recompute_main(args, names, overrides)
    if "1" not in names:
        names.insert(0, "1")  # the baseline every ratio is against
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run_layout(name, args, overrides, Path(tmp))
            print(f"measured {name}", file=sys.stderr)
    report(results)


def recompute_main(args, names: list[str], overrides: list[str]) -> None:
    modes = args.recompute.split(",")
    bad = [m for m in modes if m not in ("none", "full", "selective")]
    if bad or "none" not in modes:
        sys.exit(f"--recompute takes none,full,selective (none included: the baseline); got {args.recompute}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            for mode in modes:
                results[(name, mode)] = run_layout(name, args, overrides, Path(tmp), mode)
                print(f"measured {name} {mode}", file=sys.stderr)
    recompute_report(results)


def recompute_report(results: dict) -> None:
    """Per layout, rank and mode: saved activation bytes, the planner's figure, step peak and time, with
    ratios against mode none of the same layout and rank."""
    print(f"{'layout':7} {'rank':>4} {'recompute':>9} {'saved GB':>8} {'saved_rel':>9} {'plan GB':>7} "
          f"{'plan/meas':>9} {'peak+ GB':>8} {'peak_rel':>8} {'s/step':>7} {'time_rel':>8}")
    for (name, mode), ranks in results.items():
        for r, m in enumerate(ranks):
            base = results[(name, "none")][r]
            print(f"{name:7} {r:>4} {mode:>9} {m['saved_gb']:8.3f} {m['saved_gb'] / base['saved_gb']:9.3f} "
                  f"{m['plan_gb']:7.3f} {m['plan_gb'] / m['saved_gb']:9.3f} {m['step_peak_above_gb']:8.3f} "
                  f"{m['step_peak_above_gb'] / base['step_peak_above_gb']:8.3f} {m['step_s']:7.2f} "
                  f"{m['step_s'] / base['step_s']:8.3f}")
    keys = ("saved_gb", "plan_gb", "step_peak_above_gb", "step_peak_gb", "step_s")
    print(json.dumps({f"{name}/{mode}": {k: [m[k] for m in ranks] for k in keys} for (name, mode), ranks in results.items()}))


def report(results: dict) -> None:
    one = results["1"][0]
    total = one["params_total"]
    keys = ("params_local", "params_reachable", "baseline_gb", "build_peak_gb", "engine_peak_gb", "step_peak_gb", "step_s")
    print(f"parameters: {total:,}; ratios are against one process; peaks above baseline for *_rel")
    print(f"{'layout':9} {'rank':>4} {'local':>7} {'reach':>7} {'base GB':>8} {'build GB':>9} {'build_rel':>9} "
          f"{'engine GB':>9} {'step GB':>8} {'step_rel':>8} {'s/step':>7}")
    one_build, one_step = one["build_peak_gb"] - one["baseline_gb"], one["step_peak_gb"] - one["baseline_gb"]
    for name, ranks in results.items():
        for r, m in enumerate(ranks):
            print(f"{name:9} {r:>4} {m['params_local'] / total:7.3f} {m['params_reachable'] / total:7.3f} "
                  f"{m['baseline_gb']:8.2f} {m['build_peak_gb']:9.2f} {(m['build_peak_gb'] - m['baseline_gb']) / one_build:9.2f} "
                  f"{m['engine_peak_gb']:9.2f} {m['step_peak_gb']:8.2f} {(m['step_peak_gb'] - m['baseline_gb']) / one_step:8.2f} "
                  f"{m['step_s']:7.2f}")
    if "tp2" in results and "tp2rows" in results:
        print(f"time per step, expert TP (tp2) / row split (tp2rows): "
              f"{results['tp2'][0]['step_s'] / results['tp2rows'][0]['step_s']:.3f}")
    print(json.dumps({"params_total": total,
                      "layouts": {name: {k: [m[k] for m in ranks] for k in keys} for name, ranks in results.items()}}))


if __name__ == "__main__":
    main()
