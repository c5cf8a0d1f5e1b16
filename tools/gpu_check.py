"""The first thing to run on a GPU machine (``make gpu-check``, about 5 minutes on one GPU, under 8):

1. the GPU-only tests (they skip on CPU);
2. a 20-step bf16 run of tiny_mixed and of tiny_moe on one GPU: losses logged and finite, a checkpoint
   saved at step 10, and a second run resumed from it that reproduces steps 11-20;
3. the three layer benchmarks' GPU lines (MoE, PKM, sparse attention).

It prints a summary to paste into docs/benchmarks.md and exits non-zero when a check failed.  On a
machine without CUDA it stops at once and says so.
"""
from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_TESTS = ["tests/test_sparse_attention_kernels.py"] + [
    f"tests/test_train.py::test_resume_is_bit_identical[{ds}]" for ds in ("zero0", "zero2_offload", "zero3_offload", "bf16")]
BENCHES = [("MoE", ["tools/bench_moe.py", "--device=cuda", "--dtype=bfloat16", "--repeats=10"]),
           ("PKM", ["tools/bench_pkm.py", "--device=cuda", "--dtype=bfloat16"]),
           ("sparse attention", ["tools/bench_attention.py", "--device=cuda"])]


def _run(cmd: list[str], timeout: float) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        code, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as err:
        code, out = 124, f"timed out after {timeout:.0f} s\n{err.stdout or ''}"
    return code, out, time.monotonic() - started


def _losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def check_preset(preset: str, work: Path, tolerance: float) -> tuple[bool, str]:
    """20 bf16 steps, a checkpoint at 10, a resume from it: (passed, one summary line)."""
    common = [sys.executable, "-m", "sparselm.train", "--config", preset, "--parallel.ds_config=bf16",
              "--train.steps=20", "--train.log_every=1", "--train.eval_every=0", "--train.progress=false",
              "--train.tensorboard=false", "--train.keep_last=0"]
    full, resumed = work / f"{preset}_full", work / f"{preset}_resumed"
    code, out, secs = _run(common + ["--train.save_every=10", f"--train.out_dir={full}"], 180)
    if code != 0:
        return False, f"{preset}: training failed ({code}):\n{out[-3000:]}"
    a = _losses(full)
    if sorted(a) != list(range(1, 21)) or not all(math.isfinite(v) for v in a.values()):
        return False, f"{preset}: losses missing or not finite: {a}"
    code, out, _ = _run(common + [f"--train.resume={full / 'checkpoints' / 'step_10'}", f"--train.out_dir={resumed}"], 180)
    if code != 0:
        return False, f"{preset}: resume failed ({code}):\n{out[-3000:]}"
    b = _losses(resumed)
    worst = max(abs(b[s] - a[s]) / abs(a[s]) for s in range(11, 21))
    ok = worst <= tolerance
    return ok, (f"{preset}: 20 bf16 steps in {secs:.0f} s, loss {a[1]:.4f} -> {a[20]:.4f}, resumed from step 10: "
                f"max relative loss difference {worst:.2e} over steps 11-20 ({'ok' if ok else 'FAILED'}, "
                f"tolerance {tolerance:g})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--skip-bench", action="store_true", help="only the tests and the two training runs")
    p.add_argument("--resume-tolerance", type=float, default=1e-3,
                   help="largest relative loss difference a resumed bf16 run may show (GPU kernels may be "
                        "non-deterministic)")
    args = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(f"gpu-check: no CUDA GPU visible to torch {torch.__version__} (a CPU-only wheel, no driver, or "
              "CUDA_VISIBLE_DEVICES empty); run it on a GPU machine with a CUDA build of torch", file=sys.stderr)
        return 1
    started = time.monotonic()
    summary = [f"### make gpu-check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA "
               f"{torch.version.cuda}, {time.strftime('%Y-%m-%d')}", ""]
    failed = []

    code, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-rs", *GPU_TESTS], 240)
    summary.append(f"- GPU tests ({secs:.0f} s): {out.strip().splitlines()[-1] if out.strip() else 'no output'}")
    if code != 0:
        failed.append("tests")
        print(out[-4000:])

    with tempfile.TemporaryDirectory(prefix="sparselm-gpu-check-") as work:
        for preset in ("tiny_mixed", "tiny_moe"):
            ok, line = check_preset(preset, Path(work), args.resume_tolerance)
            summary.append(f"- {line}")
            if not ok:
                failed.append(preset)

    if not args.skip_bench:
        for name, cmd in BENCHES:
            code, out, secs = _run([sys.executable, *cmd], 120)
            summary.append(f"- {name} benchmark ({secs:.0f} s, `{' '.join(cmd)}`):")
            summary.append("```")
            summary.extend(out.strip().splitlines()[-12:])
            summary.append("```")
            if code != 0:
                failed.append(name)

    summary.append(f"\nTotal {time.monotonic() - started:.0f} s; "
                   + (f"FAILED: {', '.join(failed)}" if failed else "all checks passed"))
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
