"""Parameter memory under ZeRO-1, ZeRO-3 and ZeRO-3 with CPU offload, measured side by side in one process each.

    python tools/bench_offload.py --config tiny_mixed [--section.key=value ...] [--steps N] [--runs zero1,zero3]

For each run (a DeepSpeed JSON from ds_configs/) a fresh process trains ``--steps`` optimizer steps of the
model (one process, the trainer's own engine) and reports:
- ``resident_param_peak_bytes``: the most parameter bytes held in working (device) storage at any moment
  of a step, sampled at every module's forward (after ZeRO-3 gathered its parameters) and at every
  parameter's gradient accumulation in backward (while its module's parameters are gathered).  A
  parameter counts with its full size while gathered (ZeRO-3: ``ds_status`` available or in flight) and
  with its partition (``ds_tensor``) while it is resident on the device (not offloaded);
  parameters outside ZeRO-3 always count whole;
- ``step_s``: mean wall time of the steps after the first;
- ``peak_rss_gb``: the process's peak resident set during the steps (VmHWM, reset when the steps start).
Ratios are against the model's parameter bytes and against the first run.  The last line is one JSON
object: ``{"params_total_bytes": N, "runs": {NAME: {"resident_param_peak_bytes": x, "step_s": y,
"peak_rss_gb": z}}}``.  On a CPU machine "device" and host memory are the same RAM, so the resident figure
is what a GPU would hold and the RSS is the whole process.

    python tools/bench_offload.py --config tiny_moe --largest [--largest-max 4096] [--section.key=value ...]

On a CUDA GPU, ``--largest`` finds instead the largest MoE model that trains ``--steps`` steps on it without
and with parameter offload (zero3, zero3_offload): the same depth and widths, ``moe.num_experts`` doubled
from the config's until a run fails for memory (CUDA out of memory, or the host's memory for the offloaded
run: killed), then bisected; each trial is a fresh process.  It prints both models' experts and parameters,
their ratio, and as its last line ``{"largest": {"zero3": {"num_experts": n, "params": p}, "zero3_offload":
{...}}, "ratio": r}``.  A run failing for another reason stops the search with its error.  Refused without
a GPU (host memory is not what it measures).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = {
    "zero1": ["--parallel.ds_config=zero1"],
    "zero3": ["--parallel.ds_config=zero3"],
    "zero3_offload": ["--parallel.ds_config=zero3_offload"],
}
QUIET = ["--train.progress=false", "--train.tensorboard=false", "--train.eval_every=0", "--train.save_every=0"]


def _param_bytes_resident(p, offloaded: bool) -> int:
    if not hasattr(p, "ds_id"):
        return p.numel() * p.element_size()
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    size = p.element_size()
    held = p.ds_numel * size if p.ds_status in (ZeroParamStatus.AVAILABLE, ZeroParamStatus.INFLIGHT) else 0
    if not offloaded and p.ds_tensor is not None:
        held += p.ds_tensor.numel() * size
    return held


class ResidentParams:
    """The peak of resident parameter bytes over samples taken at module forwards and gradient accumulations."""

    def __init__(self, module, offloaded: bool):
        self.params = list({id(p): p for p in module.parameters()}.values())
        self.offloaded, self.peak = offloaded, 0
        self.handles = [m.register_forward_pre_hook(lambda *_: self.sample()) for m in module.modules()]
        self.handles += [p.register_post_accumulate_grad_hook(lambda *_: self.sample()) for p in self.params
                         if p.requires_grad]

    def sample(self) -> None:
        self.peak = max(self.peak, sum(_param_bytes_resident(p, self.offloaded) for p in self.params))


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _peak_rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(config: str, overrides: list[str], steps: int) -> dict:
    """Train ``steps`` steps in this process; the figures of one run."""
    from sparselm.training.launch import prepare, start
    from sparselm.training.optim import lr_at, set_lr

    out = tempfile.mkdtemp(prefix="bench-offload-")
    cfg = prepare(config, overrides + QUIET + [f"--train.out_dir={out}", f"--train.steps={steps}"])
    trainer = start(cfg)
    zero = trainer.ds_config["zero_optimization"]
    offloaded = zero.get("offload_param", {}).get("device", "none") != "none"
    total = sum(p.ds_numel * p.element_size() if hasattr(p, "ds_id") else p.numel() * p.element_size()
                for p in {id(p): p for p in trainer.engine.module.parameters()}.values())
    probe = ResidentParams(trainer.engine.module, offloaded)
    _reset_peak_rss()
    times = []
    for step in range(steps):
        set_lr(trainer.engine.optimizer, lr_at(step, cfg.optim, steps))
        batch = trainer.train_data.batch(trainer.sampler.next_batch())
        started = time.perf_counter()
        record = trainer.train_step(batch)
        times.append(time.perf_counter() - started)
    trainer.close()
    later = times[1:] or times
    return {"params_total_bytes": total, "resident_param_peak_bytes": probe.peak, "step_s": sum(later) / len(later),
            "peak_rss_gb": _peak_rss_bytes() / 2**30, "loss": record["loss"], "zero_stage": zero.get("stage", 0)}


def _run_child(name: str, config: str, overrides: list[str], steps: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, __file__, "--child", name, "--config", config, f"--steps={steps}", *overrides, *RUNS[name]]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"bench_offload: run {name} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def largest_fitting(fits, start: int, limit: int) -> int | None:
    """The largest n in [start, limit] with ``fits(n)``, assuming fitting is monotone (a larger model never
    fits where a smaller one does not): doubling from ``start``, then bisection.  None when ``start`` does
    not fit.  Calls ``fits`` O(log(limit / start)) times."""
    if not fits(start):
        return None
    good, bad = start, None
    while bad is None:
        trial = min(2 * good, limit)
        if trial == good:
            return good
        if fits(trial):
            good = trial
        else:
            bad = trial
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


def _trial(name: str, config: str, overrides: list[str], steps: int, experts: int) -> bool:
    """Whether ``config`` with ``experts`` routed experts trains ``steps`` steps under run ``name`` in a fresh
    process; False when it ran out of GPU memory (or was killed, as the kernel does when the host's memory
    runs out under offload); any other failure stops with its error."""
    cmd = [sys.executable, __file__, "--child", name, "--config", config, f"--steps={steps}", *overrides, *RUNS[name],
           f"--moe.num_experts={experts}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return True
    memory = ("out of memory", "not enough memory", "cannot allocate memory")  # CUDA, torch's CPU allocator, OS
    if any(m in proc.stderr.lower() for m in memory) or proc.returncode in (-9, 137):
        return False
    raise SystemExit(f"bench_offload: {name} with moe.num_experts={experts} failed (exit {proc.returncode}), not for "
                     f"memory:\n{proc.stderr[-3000:]}")


def _params(config: str, overrides: list[str], experts: int) -> int:
    from sparselm.config import load_config
    from sparselm.model import build_model
    from sparselm.data.vocab import derive_vocab_size

    cfg = load_config(config, overrides + [f"--moe.num_experts={experts}"], check=False)
    derive_vocab_size(cfg)
    return build_model(cfg, device="meta").num_params()


def search_largest(config: str, overrides: list[str], steps: int, limit: int) -> dict:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_offload --largest needs a CUDA GPU: it finds the largest model that fits in GPU "
                         "memory, which a CPU machine does not have; run it on a GPU node (make gpu-check first)")
    from sparselm.config import load_config

    cfg = load_config(config, overrides, check=False)
    start = cfg.moe.num_experts
    # every count tried must be a valid config: a multiple of the expert-parallel degree times the experts
    # ZeRO-3 gathers at once
    unit = cfg.parallel.ep * max(1, cfg.parallel.zero3_experts_per_gather)
    if limit < start or start % unit:
        raise SystemExit(f"bench_offload --largest: the search starts at the config's moe.num_experts={start} and "
                         f"grows in multiples of {unit} (parallel.ep x zero3_experts_per_gather) up to --largest-max="
                         f"{limit}; pick a start that is such a multiple and a larger --largest-max")
    found = {}
    for name in ("zero3", "zero3_offload"):
        units = largest_fitting(lambda k: _trial(name, config, overrides, steps, k * unit), start // unit, limit // unit)
        experts = units * unit if units else None
        found[name] = {"num_experts": experts, "params": _params(config, overrides, experts) if experts else 0}
        print(f"{name}: largest {experts} experts, {found[name]['params']:,} parameters", flush=True)
    ratio = found["zero3_offload"]["params"] / found["zero3"]["params"] if found["zero3"]["params"] else None
    print(f"largest with parameter offload / without: {ratio:.2f}x" if ratio else "no model fits without offload")
    summary = {"largest": found, "ratio": ratio}
    print(json.dumps(summary))
    return summary


def _parse(argv: list[str]):
    config, steps, runs, child, rest = None, 3, list(RUNS), None, []
    largest, limit = False, 4096
    it = iter(argv)
    for arg in it:
        key, _, value = arg.partition("=")
        if key in ("--config", "--steps", "--runs", "--child", "--largest-max") and not value:
            value = next(it)
        if key == "--config":
            config = value
        elif key == "--steps":
            steps = int(value)
        elif key == "--runs":
            runs = value.split(",")
        elif key == "--child":
            child = value
        elif key == "--largest":
            largest = True
        elif key == "--largest-max":
            limit = int(value)
        else:
            rest.append(arg)
    if config is None:
        raise SystemExit("usage: tools/bench_offload.py --config NAME [--section.key=value ...] [--steps N] [--runs a,b]"
                         " [--largest [--largest-max N]]")
    if limit < 1:
        raise SystemExit(f"bench_offload: --largest-max={limit}: give the most experts to try (>= 1)")
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        raise SystemExit(f"bench_offload: unknown run(s) {unknown}; choose from {', '.join(RUNS)}")
    return config, steps, runs, child, rest, (largest, limit)


def main(argv: list[str] | None = None) -> dict:
    config, steps, runs, child, overrides, (largest, limit) = _parse(sys.argv[1:] if argv is None else argv)
    if child is not None:
        result = measure(config, overrides, steps)
        print(json.dumps(result), flush=True)
        return result
    if largest:
        return search_largest(config, overrides, steps, limit)
    results = {name: _run_child(name, config, overrides, steps) for name in runs}
    total = results[runs[0]]["params_total_bytes"]
    base = results[runs[0]]
    print(f"{config} {' '.join(overrides)}: {total / 2**20:.2f} MiB of fp32 parameters, {steps} steps per run")
    print(f"{'run':<15}{'resident peak MiB':>18}{'x model':>9}{'step s':>9}{'x ' + runs[0]:>9}{'peak RSS GB':>13}"
          f"{'loss':>9}")
    for name, r in results.items():
        print(f"{name:<15}{r['resident_param_peak_bytes'] / 2**20:>18.2f}{r['resident_param_peak_bytes'] / total:>9.2f}"
              f"{r['step_s']:>9.3f}{r['step_s'] / base['step_s']:>9.2f}{r['peak_rss_gb']:>13.2f}{r['loss']:>9.4f}")
    summary = {"params_total_bytes": total,
               "runs": {name: {k: r[k] for k in ("resident_param_peak_bytes", "step_s", "peak_rss_gb")}
                        for name, r in results.items()}}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
