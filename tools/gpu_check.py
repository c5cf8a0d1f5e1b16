"""The first thing to run on a GPU machine: ``python3 tools/gpu_check.py`` (or ``make gpu-check``), with the
machine's own torch (deepspeed, megatron-core and the rest installed beside it from wheels): no setup, no
registry.  Made to fit 5 minutes on one H200, every Python start included (not yet timed on a GPU: none was
lent when it was written; each section has a time cap, together under 10 minutes).  Four sections, one
process each (a crash or a hang in one is named and the next still runs; inside a section a failing case
is named and the next case runs):

- tests: the GPU-only tests (device placement under ZeRO 0-3 and offload, no host sync in a MoE forward,
  compiled FlexAttention kernels), which skip on CPU;
- train: every block kind (dense, moe, pkm, pkm_ffn, Memory+, allattn, tiny_mixed) 5 bf16 steps under
  ZeRO-1, ZeRO-3 and ZeRO-3 with parameter and optimizer offload, losses agreeing across the three
  stages (bf16 tolerance); a save at step 3 and a resume reproducing steps 4-6;
- bench: the MoE, PKM and attention layer benchmarks at the issue's shapes;
- throughput: dense, MoE, PKM and all-attention models at d_model 2048, 8 layers, seq 2048, batch 8
  (ZeRO-1 bf16): tok/s, TFLOP/s, MFU, peak GPU memory, with and without train.compile.

It prints a table and one line ``gpu_check_json: {...}`` and exits 1 when a case failed (naming it).
``--cpu-smoke`` runs the same orchestration on CPU at toy sizes (the test suite runs it:
tests/e2e/tools/test_gpu_check.py); without ``--cpu-smoke`` a machine without CUDA stops at once.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from sparselm.training.metrics import read_metrics

REPO = Path(__file__).resolve().parent.parent
SECTIONS = ("tests", "train", "bench", "throughput")
TIMEOUTS = {"tests": 150, "train": 150, "bench": 60, "throughput": 200}  # caps per section on the GPU (sum < 10 min)

# The GPU-only tests are those marked ``gpu`` (pytest.ini), all unit tests of the model and training rooms:
# collecting tests/unit only keeps the e2e and distributed files (and what they import) off the GPU machine.
# The CPU rehearsal selects them from one file.
GPU_TESTS = ["-m", "gpu", "tests/unit"]
SMOKE_TESTS = ["-m", "gpu", "tests/unit/model/test_moe_combine.py"]

KINDS = {  # block kind -> preset and overrides (the presets' small sizes: a correctness check)
    "dense": ("tiny_dense", []),
    "moe": ("tiny_moe", []),
    "pkm": ("tiny_pkm", []),
    "pkm_ffn": ("tiny_pkm", ["--model.pattern=[dense,pkm_ffn]"]),
    "memory_plus": ("tiny_pkm", ["--pkm.gated=true"]),
    "allattn": ("tiny_allattn", []),
    "tiny_mixed": ("tiny_mixed", []),
}
SMOKE_KINDS = ("tiny_mixed",)  # every block kind in one model
SMOKE_SIZE = ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=4", "--data.seq_len=16",
              "--model.max_seq_len=16", "--train.global_batch_size=4", "--pkm.n_keys=64", "--pkm.knn=4",
              "--pkm.k_dim=16", "--attention.window=8"]
STAGES = {"zero1": "zero1", "zero3": "zero3", "zero3_offload": "zero3_offload"}  # + bf16 (written to the work dir)
RUN = ["--train.log_every=1", "--train.eval_every=0", "--train.progress=false", "--train.tensorboard=false",
       "--model.vocab_size=0"]

BIG = ["--model.d_model=2048", "--model.n_layers=8", "--model.n_heads=16", "--data.seq_len=2048",
       "--model.max_seq_len=2048", "--train.global_batch_size=8"]
MODELS = {  # throughput table: the shape, byte vocabulary
    "dense": ("tiny_dense", BIG),
    "moe": ("tiny_moe", BIG + ["--moe.num_experts=8", "--moe.top_k=2", "--moe.num_shared_experts=0"]),
    "pkm": ("tiny_pkm", BIG + ["--model.pattern=[dense,dense,dense,pkm]", "--pkm.n_keys=262144", "--pkm.heads=4",
                               "--pkm.knn=32", "--pkm.k_dim=256"]),
    "allattn": ("tiny_allattn", BIG + ["--attention.window=256", "--attention.persistent_slots=1024"]),
}
SMOKE_MODELS = ["--model.d_model=32", "--model.n_layers=4", "--model.n_heads=2", "--data.seq_len=32",
                "--model.max_seq_len=32", "--train.global_batch_size=2", "--pkm.n_keys=64", "--pkm.knn=4",
                "--pkm.k_dim=16", "--attention.window=8", "--attention.persistent_slots=8"]

BENCHES = {  # name -> (module, argv on the GPU, argv in the smoke)
    "moe": ("tools.bench_moe", ["--device=cuda", "--dtype=bfloat16", "--experts=8,64", "--tokens=16384",
                                "--d-model=2048", "--expert-hidden=1408", "--repeats=10"],
            ["--device=cpu", "--experts=4", "--tokens=64", "--d-model=32", "--expert-hidden=32", "--repeats=1",
             "--warmup=0"]),
    "pkm": ("tools.bench_pkm", ["--device=cuda", "--dtype=bfloat16", "--d-model=2048", "--tokens=16384",
                                "--seq-len=2048", "--n-keys=262144", "--k-dim=256"],
            ["--device=cpu", "--d-model=32", "--tokens=64", "--seq-len=32", "--n-keys=64", "--knn=4", "--k-dim=16",
             "--iters=1", "--warmup=0"]),
    "attention": ("tools.bench_attention", ["--device=cuda", "--window=256", "--lengths=4096,16384"],
                  ["--device=cpu", "--window=8", "--lengths=64", "--repeats=1", "--warmup=0", "--heads=2",
                   "--head-dim=16"]),
}


# ------------------------------------------------------------------------------------------- workers
def _record(result_file: Path, **case) -> dict:
    with open(result_file, "a") as f:
        f.write(json.dumps(case) + "\n")
    return case


def _train(argv: list[str]) -> None:
    """One run through the real entry point in this process; the process groups are released after a failure
    too, so the next case can start."""
    from sparselm.train import main

    try:
        main(argv)
    except BaseException:
        try:
            from megatron.core import parallel_state

            parallel_state.destroy_model_parallel()
            from sparselm.training.runtime import forget_solo_world

            forget_solo_world()
        except Exception:  # noqa: BLE001 - best effort; the case is reported failed either way
            pass
        raise


def _bf16_configs(work: Path) -> dict[str, str]:
    """ZeRO-1, ZeRO-3 and ZeRO-3-offload DeepSpeed JSONs with bf16 on (paths in ``work``)."""
    from sparselm.training.ds_config import load_ds_json

    paths = {}
    for stage, name in STAGES.items():
        ds = load_ds_json(name)
        ds["bf16"] = {"enabled": True}
        paths[stage] = str(work / f"{stage}_bf16.json")
        Path(paths[stage]).write_text(json.dumps(ds))
    return paths


def section_train(smoke: bool, work: Path, result_file: Path) -> None:
    steps, tol = 5, 2e-2  # bf16: the stages reduce in different orders; 5 steps stay within 2%
    configs = _bf16_configs(work)
    size = SMOKE_SIZE if smoke else []
    for kind in (SMOKE_KINDS if smoke else KINDS):
        preset, extra = KINDS[kind]
        losses = {}
        for stage, ds in configs.items():
            out, started = work / f"train-{kind}-{stage}", time.monotonic()
            try:
                _train(["--config", preset, *RUN, *extra, *size, f"--train.steps={steps}", "--train.save_every=0",
                        f"--parallel.ds_config={ds}", f"--train.out_dir={out}"])
                rows = read_metrics(out, train_only=True)
                losses[stage] = [r["loss"] for r in rows]
                ok = len(rows) == steps and all(math.isfinite(v) for v in losses[stage])
                _record(result_file, section="train", case=f"{kind}/{stage}", ok=ok, seconds=time.monotonic() - started,
                        losses=losses[stage])
            except BaseException as err:  # noqa: BLE001 - named and skipped
                _record(result_file, section="train", case=f"{kind}/{stage}", ok=False, error=_why(err))
            _release()
        if len(losses) == len(configs):
            ref = losses["zero1"]
            worst = max(abs(a - b) / abs(b) for run in losses.values() for a, b in zip(run, ref))
            _record(result_file, section="train", case=f"{kind}/stages_agree", ok=worst <= tol, max_rel_diff=worst,
                    tolerance=tol)
    # a save at step 3 and a resume from it
    preset, extra = KINDS["tiny_mixed"]
    base = ["--config", preset, *RUN, *extra, *size, "--train.steps=6", f"--parallel.ds_config={configs['zero1']}"]
    try:
        full, resumed = work / "resume-full", work / "resume-resumed"
        _train(base + ["--train.save_every=3", f"--train.out_dir={full}"])
        _train(base + [f"--train.resume={full / 'checkpoints' / 'step_3'}", f"--train.out_dir={resumed}"])
        a = {r["step"]: r["loss"] for r in read_metrics(full, train_only=True)}
        b = {r["step"]: r["loss"] for r in read_metrics(resumed, train_only=True)}
        worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in (4, 5, 6))
        _record(result_file, section="train", case="tiny_mixed/save_resume", ok=worst <= 1e-3, max_rel_diff=worst,
                exact=worst == 0)
    except BaseException as err:  # noqa: BLE001
        _record(result_file, section="train", case="tiny_mixed/save_resume", ok=False, error=_why(err))


def section_bench(smoke: bool, work: Path, result_file: Path) -> None:
    import importlib
    import io
    from contextlib import redirect_stdout

    for name, (module, gpu_argv, smoke_argv) in BENCHES.items():
        argv, started, text = (smoke_argv if smoke else gpu_argv), time.monotonic(), io.StringIO()
        try:
            with redirect_stdout(text):
                result = importlib.import_module(module).main(argv)
            _record(result_file, section="bench", case=name, ok=True, seconds=time.monotonic() - started,
                    command=f"python {module.replace('.', '/')}.py {' '.join(argv)}", output=text.getvalue(),
                    result=_jsonable(result))
        except BaseException as err:  # noqa: BLE001
            _record(result_file, section="bench", case=name, ok=False, error=_why(err), output=text.getvalue()[-2000:])


def section_throughput(smoke: bool, work: Path, result_file: Path) -> None:
    import torch

    import sparselm.training.compile

    cuda = torch.cuda.is_available()
    if smoke:  # dynamo and AOT autograd without inductor's C++ build (about 30 s per block kind on CPU)
        sparselm.training.compile.BACKEND = "aot_eager"
    steps = 4 if smoke else 12
    configs = _bf16_configs(work)
    for name, (preset, size) in MODELS.items():
        for compiled in (False, True):
            case, out = f"{name}/{'compile' if compiled else 'eager'}", work / f"tp-{name}-{compiled}"
            _release()
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            torch._dynamo.reset()
            started = time.monotonic()
            try:
                _train(["--config", preset, *RUN, *size, *(SMOKE_MODELS if smoke else []), f"--train.steps={steps}",
                        "--train.save_every=0", f"--train.compile={str(compiled).lower()}",
                        f"--parallel.ds_config={configs['zero1']}", f"--train.out_dir={out}"])
                rows = read_metrics(out, train_only=True)[steps // 2:]  # after compilation and warm-up
                _record(result_file, section="throughput", case=case, ok=True, seconds=time.monotonic() - started,
                        tokens_per_s=statistics.median(r["tokens_per_s"] for r in rows),
                        tflops=statistics.median(r["tflops"] for r in rows),
                        mfu=statistics.median(r["mfu"] for r in rows) if "mfu" in rows[0] else None,
                        peak_gib=torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None)
            except BaseException as err:  # noqa: BLE001
                _record(result_file, section="throughput", case=case, ok=False, error=_why(err))


def _release() -> None:
    """Free the previous run's engine and its GPU memory before the next one starts."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _why(err: BaseException) -> str:
    lines = traceback.format_exception(type(err), err, err.__traceback__)
    return (f"{type(err).__name__}: {err}".strip()[:500] + "\n" + "".join(lines[-3:]))[-1500:]


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def worker(section: str, smoke: bool, work: Path, result_file: Path) -> int:
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    {"train": section_train, "bench": section_bench, "throughput": section_throughput}[section](smoke, work, result_file)
    return 0


# -------------------------------------------------------------------------------------- orchestration
def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env())
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as err:
        tail = err.stdout.decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        code, out = 124, f"timed out after {timeout:.0f} s\n{tail}"
    return code, out, time.monotonic() - started


def run_tests(smoke: bool, timeout: float) -> list[dict]:
    files = SMOKE_TESTS if smoke else GPU_TESTS
    code, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *files], timeout)
    last = out.strip().splitlines()[-1] if out.strip() else "no output"
    case = {"section": "tests", "case": "gpu_only_tests", "ok": code == 0, "seconds": secs, "summary": last}
    if code != 0:
        case["error"] = out[-3000:]
    return [case]


def run_section(section: str, smoke: bool, work: Path, timeout: float) -> list[dict]:
    if section == "tests":
        return run_tests(smoke, timeout)
    result_file = work / f"{section}.jsonl"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", section, "--work", str(work),
           "--result", str(result_file)] + (["--cpu-smoke"] if smoke else [])
    code, out, secs = _run(cmd, timeout)
    cases = [json.loads(line) for line in result_file.read_text().splitlines()] if result_file.exists() else []
    if code != 0:  # a crash or a time-out: what it finished stays, the section is named failed
        cases.append({"section": section, "case": "process", "ok": False, "seconds": secs,
                      "error": f"exit {code}\n{out[-3000:]}"})
    return cases


def table(cases: list[dict]) -> list[str]:
    lines = ["| section | case | ok | figures |", "|---|---|---|---|"]
    for c in cases:
        if c["section"] == "throughput" and c["ok"]:
            mfu = f", MFU {c['mfu']:.3f}" if c.get("mfu") is not None else ""
            mem = f", peak {c['peak_gib']:.1f} GiB" if c.get("peak_gib") is not None else ""
            fig = f"{c['tokens_per_s']:,.0f} tok/s, {c['tflops']:.1f} TFLOP/s{mfu}{mem}"
        elif c["section"] == "train" and "max_rel_diff" in c:
            fig = f"max relative loss difference {c['max_rel_diff']:.2e}"
        elif c["section"] == "train" and "losses" in c:
            fig = f"loss {c['losses'][0]:.4f} -> {c['losses'][-1]:.4f} ({c.get('seconds', 0):.0f} s)"
        elif c["section"] == "tests":
            fig = c.get("summary", "")
        elif c["section"] == "bench" and c["ok"]:
            fig = f"`{c['command']}` ({c['seconds']:.0f} s)"
        else:
            fig = ""
        if not c["ok"]:
            fig = (fig + " " + c.get("error", "").strip().splitlines()[0][:160] if c.get("error") else fig).strip()
        lines.append(f"| {c['section']} | {c['case']} | {'ok' if c['ok'] else 'FAILED'} | {fig} |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-smoke", action="store_true", help="the same orchestration on CPU at toy sizes")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    p.add_argument("--worker", choices=[s for s in SECTIONS if s != "tests"], help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker, args.cpu_smoke, Path(args.work), Path(args.result))

    import torch

    if not args.cpu_smoke and not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU visible to torch {torch.__version__} (a CPU-only wheel, no driver, or "
              "CUDA_VISIBLE_DEVICES empty); run it on a GPU machine, or --cpu-smoke for the CPU rehearsal",
              file=sys.stderr)
        return 1
    sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    started = time.monotonic()
    device = "CPU smoke" if args.cpu_smoke else torch.cuda.get_device_name(0)
    print(f"gpu-check: {device}, torch {torch.__version__}, CUDA {torch.version.cuda}, sections {','.join(sections)}",
          flush=True)
    cases: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="sparselm-gpu-check-") as work:
        for section in sections:
            found = run_section(section, args.cpu_smoke, Path(work), TIMEOUTS[section] * (3 if args.cpu_smoke else 1))
            for c in found:
                print(f"  {c['section']}/{c['case']}: {'ok' if c['ok'] else 'FAILED'}", flush=True)
                if not c["ok"] and c.get("error"):
                    print("    " + c["error"].strip()[-1500:].replace("\n", "\n    "), flush=True)
            cases.extend(found)
    failed = [f"{c['section']}/{c['case']}" for c in cases if not c["ok"]]
    total = time.monotonic() - started
    print("\n".join(table(cases)))
    for c in cases:
        if c["section"] == "bench" and c.get("output"):
            print(f"\n{c['command']}\n```\n{c['output'].strip()}\n```")
    print(f"\nTotal {total:.0f} s; " + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    summary = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda, "seconds": round(total, 1),
               "failed": failed,
               "cases": [{k: v for k, v in c.items() if k not in ("output", "error", "result")} for c in cases]}
    print("gpu_check_json: " + json.dumps(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
