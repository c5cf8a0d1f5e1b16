#!/usr/bin/env python
"""Scaling-law sweeps and fits.

  python tools/scaling.py sweep --family dense --sizes 32x2,64x3,128x4 --tokens 800000 --out runs/scaling
  python tools/scaling.py sweep --family moe --target-n 1e5,3e5,1e6 --compute 5e12 --out runs/scaling
  python tools/scaling.py collect --out runs/scaling
  python tools/scaling.py fit --csv runs/scaling/results.csv --plot runs/scaling/scaling.png [--irreducible]

sweep: from a base preset (default per family: tiny_dense, tiny_moe, tiny_pkm, tiny_allattn) and a list
of sizes, either ``DxL`` / ``DxLxH`` (d_model x n_layers [x n_heads]; heads default to d_model / --head-dim)
or target non-embedding parameter counts (--target-n, shaped at d_model / n_layers = --aspect), plus a
token budget per run (--tokens) or a compute budget per run (--compute, training FLOPs), it writes one
resolved config per run to OUT/configs/ and runs them one after another (--launch local: each its own
process, the default; inprocess: in this process, for tests; print: only print the commands, with
--launcher as prefix, e.g. 'sbatch slurm/train.sbatch' or 'deepspeed --num_gpus 8 --module sparselm.train').
Finished runs are skipped, so a sweep can be continued.  Extra arguments (--section.key=value) go to
every run.  Family patterns: dense [dense], moe [moe], allattn [allattn], pkm a memory in the middle layer.

collect (also the last step of sweep): every run under OUT/runs/ -> OUT/results.csv (one row per run:
family, run, d_model, n_layers, N (Kaplan's non-embedding parameters), N_active, N_total, flops_per_token,
D (tokens trained), C = flops_per_token * D, train_loss (mean lm_loss over the last tenth of the logged
steps), val_loss (last evaluation), tflops) and OUT/curves.csv (one row per evaluation of every run:
D and C so far, val_loss).

fit: L(N) = (N_c / N)^alpha_N over the runs' final validation losses (also against N_active when it
differs), L(D) over the evaluations of each family's largest model, L(C) over the compute-efficient
frontier of all evaluations of a family (Kaplan's L(C_min)), both without the evaluations of the first
--skip-early fraction of each run (warmup and the first fast drop): least squares in log space, with
--irreducible L = E + (x_c / x)^alpha (E profiled on a grid), 95% bootstrap intervals (--bootstrap
resamples of the points).  Prints the exponents beside Kaplan et al. 2020's, plots loss against N, D
and C with the fitted lines (--plot PNG), and for every family beside 'dense' the compute multiplier:
C_dense(L) / C_family(L) from the two L(C) fits over the loss range both families reached, and from one
fit of both frontiers with a shared exponent (then one number at every loss).  The last line
is one JSON object with every fit.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from sparselm.training.launch import run_in_process
from sparselm.training.metrics import read_metrics

FAMILY_BASE = {"dense": "tiny_dense", "moe": "tiny_moe", "pkm": "tiny_pkm", "allattn": "tiny_allattn"}
KAPLAN = {"N": 0.076, "N_active": 0.076, "D": 0.095, "C": 0.050}
"""Kaplan et al. 2020 exponents (alpha_C is their compute-efficient frontier's, alpha_C^min)."""
RESULT_FIELDS = ["family", "run", "d_model", "n_layers", "n_heads", "N", "N_active", "N_total", "flops_per_token",
                 "steps", "D", "C", "train_loss", "val_loss", "tflops", "tokens_per_s"]
CURVE_FIELDS = ["family", "run", "N", "N_active", "step", "D", "C", "val_loss"]


# ------------------------------------------------------------------------------------------------ sweep
def family_pattern(family: str, n_layers: int) -> list[str]:
    if family == "pkm":
        return ["pkm" if i == n_layers // 2 else "dense" for i in range(n_layers)]
    if family in ("dense", "moe", "allattn"):
        return [family]
    raise SystemExit(f"scaling: unknown family '{family}'; choose dense, moe, pkm or allattn")


def parse_size(text: str, head_dim: int) -> tuple[int, int, int]:
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) not in (2, 3) or min(parts) <= 0:
        raise SystemExit(f"scaling: size '{text}' is not DxL or DxLxH (d_model x n_layers [x n_heads])")
    d, layers = parts[0], parts[1]
    heads = parts[2] if len(parts) == 3 else max(1, d // head_dim)
    return d, layers, heads


def make_config(base: str, family: str, d: int, layers: int, heads: int, overrides: list[str]):
    from sparselm.config import load_config
    from sparselm.data.vocab import derive_vocab_size

    pattern = ",".join(family_pattern(family, layers))
    cfg = load_config(base, [f"--model.d_model={d}", f"--model.n_layers={layers}", f"--model.n_heads={heads}",
                             f"--model.pattern={pattern}", *overrides])
    derive_vocab_size(cfg)
    return cfg


def shape_for_n(target: float, base: str, family: str, aspect: float, head_dim: int, overrides: list[str]):
    """(d_model, n_layers, heads) whose non-embedding N is nearest ``target`` (log distance) with
    d_model / n_layers near ``aspect``; d_model a multiple of head_dim."""
    from sparselm.planning.flops import param_counts

    best = None
    for d in range(head_dim, 64 * head_dim + 1, head_dim):
        layers = max(1, round(d / aspect))
        n = param_counts(make_config(base, family, d, layers, d // head_dim, overrides)).non_embedding
        score = abs(math.log(n / target))
        if best is None or score < best[0]:
            best = (score, d, layers, d // head_dim)
        if n > 4 * target:
            break
    return best[1:]


def sweep(args, overrides: list[str]) -> list[dict]:
    from sparselm.config import to_yaml
    from sparselm.planning.flops import flop_counts

    if (args.tokens is None) == (args.compute is None):
        raise SystemExit("scaling: give one budget per run: --tokens D or --compute C")
    base = args.base or FAMILY_BASE[args.family]
    if args.sizes:
        shapes = [parse_size(s, args.head_dim) for s in args.sizes.split(",")]
    elif args.target_n:
        shapes = [shape_for_n(float(t), base, args.family, args.aspect, args.head_dim, overrides)
                  for t in args.target_n.split(",")]
    else:
        raise SystemExit("scaling: give the sizes: --sizes DxL,... or --target-n N1,N2,...")
    out = Path(args.out)
    (out / "configs").mkdir(parents=True, exist_ok=True)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    commands = []
    for d, layers, heads in shapes:
        cfg = make_config(base, args.family, d, layers, heads, overrides)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        if args.tokens is not None:
            steps = max(1, round(args.tokens / tokens_per_step))
        else:
            steps = max(1, round(args.compute / (flop_counts(cfg).per_token * tokens_per_step)))
        cfg.train.steps = steps
        cfg.optim.warmup_steps = min(cfg.optim.warmup_steps, max(1, steps // 10))
        if args.evals:
            cfg.train.eval_every = max(1, steps // args.evals)
        name = f"{args.family}_d{d}_l{layers}"
        run_dir = out / "runs" / name
        cfg.train.out_dir = str(run_dir)
        path = out / "configs" / f"{name}.yaml"
        path.write_text(to_yaml(cfg))
        manifest[name] = {"family": args.family, "config": str(path)}
        commands.append((name, path, run_dir, steps))
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")

    prefix = shlex.split(args.launcher) if args.launcher else [sys.executable, "-m", "sparselm.train"]
    for name, path, run_dir, steps in commands:
        argv = ["--config", str(path), f"--train.out_dir={run_dir}"]
        if args.launch == "print":
            print(shlex.join(prefix + argv))
            continue
        if run_finished(run_dir, steps):
            print(f"scaling: {name}: finished earlier, kept")
            continue
        if run_dir.exists():
            shutil.rmtree(run_dir)  # an interrupted run (only the final checkpoint is saved): start again
        print(f"scaling: {name}: {steps} steps", flush=True)
        if args.launch == "inprocess":
            train_in_process(argv)
        else:
            subprocess.run(prefix + argv, check=True)
    if args.launch == "print":
        return []
    return collect(out)


def train_in_process(argv: list[str]) -> None:
    run_in_process(argv[1], argv[2:])


def run_finished(run_dir: Path, steps: int) -> bool:
    return (run_dir / "checkpoints" / "latest").exists() and any(r.get("step") == steps for r in read_metrics(run_dir))


# ---------------------------------------------------------------------------------------------- collect
def infer_family(pattern: list[str]) -> str:
    for kind in ("moe", "pkm", "allattn"):
        if any(k.startswith(kind) for k in pattern):
            return kind
    return "dense"


def collect(out: Path) -> list[dict]:
    """results.csv and curves.csv from every finished run under OUT/runs/."""
    from sparselm.config import load_config
    from sparselm.planning.flops import flop_counts, param_counts

    out = Path(out)
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    rows, curves = [], []
    for run_dir in sorted((out / "runs").iterdir()) if (out / "runs").is_dir() else []:
        cfg_path = run_dir / "config.yaml"
        if not cfg_path.is_file():
            continue
        cfg = load_config(str(cfg_path), check=False)
        metrics = read_metrics(run_dir)
        train = [r for r in metrics if "lm_loss" in r]
        if not train or train[-1]["step"] != cfg.train.steps:
            print(f"scaling: {run_dir.name}: unfinished, left out")
            continue
        p, f = param_counts(cfg), flop_counts(cfg)
        tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
        family = manifest.get(run_dir.name, {}).get("family") or infer_family(cfg.model.pattern)
        tail = train[-max(1, len(train) // 10):]
        evals = [r for r in metrics if "val_loss" in r]
        rates = [r["tflops"] for r in train if "tflops" in r]
        row = {"family": family, "run": run_dir.name, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
               "n_heads": cfg.model.n_heads, "N": p.non_embedding, "N_active": p.non_embedding_active,
               "N_total": p.total, "flops_per_token": f.per_token, "steps": cfg.train.steps,
               "D": cfg.train.steps * tokens_per_step, "C": f.per_token * cfg.train.steps * tokens_per_step,
               "train_loss": float(np.mean([r["lm_loss"] for r in tail])),
               "val_loss": evals[-1]["val_loss"] if evals else float("nan"),
               "tflops": float(np.median(rates)) if rates else float("nan"),
               "tokens_per_s": float(np.median([r["tokens_per_s"] for r in train]))}
        rows.append(row)
        for r in evals:
            d = r["step"] * tokens_per_step
            curves.append({"family": family, "run": run_dir.name, "N": p.non_embedding, "N_active": p.non_embedding_active,
                           "step": r["step"], "D": d, "C": f.per_token * d, "val_loss": r["val_loss"]})
    write_csv(out / "results.csv", RESULT_FIELDS, rows)
    write_csv(out / "curves.csv", CURVE_FIELDS, curves)
    print(f"scaling: {len(rows)} runs -> {out / 'results.csv'}, {len(curves)} evaluations -> {out / 'curves.csv'}")
    for r in rows:
        print(f"  {r['run']:24s} N {r['N']:>10,} N_active {r['N_active']:>10,} D {r['D']:>11,} C {r['C']:.3e} "
              f"train {r['train_loss']:.4f} val {r['val_loss']:.4f}")
    return rows


def write_csv(path: Path, names: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.10g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:
        for k, v in row.items():
            if k not in ("family", "run"):
                row[k] = float(v)
    return rows


# -------------------------------------------------------------------------------------------------- fit
def _linear(logx: np.ndarray, logy: np.ndarray) -> tuple[float, float, float]:
    """Least squares logy = a + b logx: (a, b, residual sum of squares)."""
    A = np.stack([np.ones_like(logx), logx], 1)
    (a, b), *_ = np.linalg.lstsq(A, logy, rcond=None)
    return float(a), float(b), float(np.sum((A @ np.array([a, b]) - logy) ** 2))


def fit_power_law(x, loss, irreducible: bool = False) -> dict:
    """L = (x_c / x)^alpha, or L = E + (x_c / x)^alpha with ``irreducible``; least squares on log L.

    Without E this is linear in log space (log L = alpha log x_c - alpha log x).  With E, log(L - E) is
    linear for a fixed E, so E is profiled: a grid over [0, min L), refined around the best by golden-
    section search, minimising the squared error of log L.  Returns {alpha, x_c, E, rss}."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    logx, logl = np.log(x), np.log(loss)

    def fit_at(e: float):
        a, b, _ = _linear(logx, np.log(loss - e))
        pred = np.log(e + np.exp(a + b * logx))
        return float(np.sum((pred - logl) ** 2)), a, b

    if not irreducible:
        a, b, rss = _linear(logx, logl)
        e = 0.0
    else:
        top = float(loss.min()) * (1 - 1e-6)
        grid = np.linspace(0.0, top, 200)
        errs = [fit_at(e)[0] for e in grid]
        i = int(np.argmin(errs))
        lo, hi = grid[max(0, i - 1)], grid[min(len(grid) - 1, i + 1)]
        g = (math.sqrt(5) - 1) / 2
        for _ in range(60):  # golden section on [lo, hi]
            c1, c2 = hi - g * (hi - lo), lo + g * (hi - lo)
            if fit_at(c1)[0] < fit_at(c2)[0]:
                hi = c2
            else:
                lo = c1
        e = (lo + hi) / 2
        rss, a, b = fit_at(e)
    alpha = -b
    x_c = math.exp(a / alpha) if alpha != 0 else float("nan")
    return {"alpha": alpha, "x_c": x_c, "E": e, "rss": rss}


def bootstrap(x, loss, irreducible: bool, samples: int, seed: int = 0) -> dict:
    """95% percentile intervals of alpha, x_c, E over fits to points resampled with replacement."""
    x, loss = np.asarray(x, float), np.asarray(loss, float)
    rng = np.random.default_rng(seed)
    fits = []
    for _ in range(samples):
        idx = rng.integers(0, len(x), len(x))
        if len(np.unique(x[idx])) < (3 if irreducible else 2):
            continue
        fits.append(fit_power_law(x[idx], loss[idx], irreducible))
    out = {"fits": fits}
    for key in ("alpha", "x_c", "E"):
        vals = np.array([f[key] for f in fits if math.isfinite(f[key])])
        out[key] = [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))] if len(vals) else [math.nan] * 2
    return out


def frontier(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Compute-efficient frontier: the points with a lower loss than every point of less compute."""
    best, out = math.inf, []
    for c, loss in sorted(points):
        if c > 0 and loss < best:
            out.append((c, loss))
            best = loss
    return out


def law_points(rows: list[dict], curves: list[dict], family: str, law: str, loss_key: str, skip_early: float = 0.0):
    """(x, loss) points of one law: final losses for N; for D and C the evaluations from ``skip_early`` of
    each run's steps on (the warmup and the first fast drop are not the regime the laws describe)."""
    mine = [r for r in rows if r["family"] == family]
    if law in ("N", "N_active"):
        return [(r[law], r[loss_key]) for r in mine if math.isfinite(r[loss_key])]
    steps = {r["run"]: r["steps"] for r in mine}
    curve = [c for c in curves if c["family"] == family and c["D"] > 0 and c["run"] in steps
             and c["step"] >= skip_early * steps[c["run"]]]
    if law == "D":
        if not mine or not curve:
            return []
        largest = max(mine, key=lambda r: r["N"])["run"]
        return [(c["D"], c["val_loss"]) for c in curve if c["run"] == largest]
    if law == "C":
        return frontier([(c["C"], c["val_loss"]) for c in curve] if curve else [(r["C"], r[loss_key]) for r in mine])
    raise ValueError(law)


def compute_multiplier(dense: dict, other: dict, losses: np.ndarray) -> np.ndarray:
    """C_dense(L) / C_other(L) from two L(C) fits without irreducible term: C(L) = C_c * L^(-1/alpha)."""
    c_dense = dense["x_c"] * losses ** (-1 / dense["alpha"])
    c_other = other["x_c"] * losses ** (-1 / other["alpha"])
    return c_dense / c_other


def shared_exponent_multiplier(dense_pts, other_pts) -> tuple[float, float]:
    """L(C) of two families fitted with one exponent and a compute scale each: log L = alpha log C_f - alpha
    log C.  Returns (alpha, C_dense / C_other): the constant compute multiplier at every loss."""
    d, o = np.log(np.asarray(dense_pts, float)), np.log(np.asarray(other_pts, float))
    rows = np.concatenate([d, o])
    A = np.zeros((len(rows), 3))
    A[: len(d), 0], A[len(d):, 1], A[:, 2] = 1.0, 1.0, rows[:, 0]
    (i_d, i_o, b), *_ = np.linalg.lstsq(A, rows[:, 1], rcond=None)
    alpha = -b
    return float(alpha), float(math.exp((i_d - i_o) / alpha))


def fit(args) -> dict:
    csv_path = Path(args.csv)
    rows = read_csv(csv_path)
    curves_path = Path(args.curves) if args.curves else csv_path.with_name("curves.csv")
    curves = read_csv(curves_path) if curves_path.is_file() else []
    families = list(dict.fromkeys(r["family"] for r in rows))
    result: dict = {"fits": {}, "compute_multiplier": {}}
    print(f"{'family':8s} {'law':9s} {'alpha':>7s} {'95% CI':>17s} {'x_c':>10s} {'E':>6s} {'Kaplan':>7s} {'points':>6s}")
    for family in families:
        for law in ("N", "N_active", "D", "C"):
            if law == "N_active" and all(r["N"] == r["N_active"] for r in rows if r["family"] == family):
                continue
            pts = law_points(rows, curves, family, law, args.loss, args.skip_early)
            if len(pts) < (3 if args.irreducible else 2):
                continue
            x, y = np.array(pts).T
            irreducible = args.irreducible and law != "C"  # the multiplier needs C(L) in closed form
            f = fit_power_law(x, y, irreducible)
            ci = bootstrap(x, y, irreducible, args.bootstrap)
            f.update(ci_alpha=ci["alpha"], ci_x_c=ci["x_c"], ci_E=ci["E"], points=[list(p) for p in pts],
                     kaplan_alpha=KAPLAN[law], boot=ci["fits"])
            result["fits"].setdefault(family, {})[law] = f
            print(f"{family:8s} {'L(' + law + ')':9s} {f['alpha']:7.4f} [{ci['alpha'][0]:7.4f},{ci['alpha'][1]:7.4f}] "
                  f"{f['x_c']:10.3e} {f['E']:6.3f} {KAPLAN[law]:7.3f} {len(pts):6d}")
    dense = result["fits"].get("dense", {}).get("C")
    for family in families:
        other = result["fits"].get(family, {}).get("C")
        if family == "dense" or dense is None or other is None:
            continue
        lo = max(min(p[1] for p in dense["points"]), min(p[1] for p in other["points"]))
        hi = min(max(p[1] for p in dense["points"]), max(p[1] for p in other["points"]))
        extrapolated = lo > hi
        if extrapolated:  # no common loss range: compare at the dense family's losses
            lo, hi = min(p[1] for p in dense["points"]), max(p[1] for p in dense["points"])
        losses = np.geomspace(lo, hi, 5)
        mult = compute_multiplier(dense, other, losses)
        mid = float(compute_multiplier(dense, other, np.array([math.sqrt(lo * hi)]))[0])
        boots = [float(compute_multiplier(d, o, np.array([math.sqrt(lo * hi)]))[0])
                 for d, o in zip(dense["boot"], other["boot"])]
        ci = [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))] if boots else [math.nan] * 2
        alpha, shared = shared_exponent_multiplier(dense["points"], other["points"])
        rng = np.random.default_rng(0)
        dp, op = np.array(dense["points"]), np.array(other["points"])
        shared_boot = [shared_exponent_multiplier(dp[rng.integers(0, len(dp), len(dp))], op[rng.integers(0, len(op), len(op))])[1]
                       for _ in range(args.bootstrap)]
        shared_ci = [float(np.percentile(shared_boot, 2.5)), float(np.percentile(shared_boot, 97.5))]
        result["compute_multiplier"][family] = {"at_loss": math.sqrt(lo * hi), "multiplier": mid, "ci": ci,
                                                "losses": losses.tolist(), "by_loss": mult.tolist(),
                                                "extrapolated": extrapolated, "shared_alpha": alpha,
                                                "shared_multiplier": shared, "shared_ci": shared_ci}
        print(f"compute multiplier {family} vs dense (C_dense / C_{family} at equal validation loss): "
              f"{mid:.3f} [{ci[0]:.3f}, {ci[1]:.3f}] at L = {math.sqrt(lo * hi):.4f}; over L {lo:.4f}..{hi:.4f}: "
              + ", ".join(f"{m:.3f}" for m in mult) + (" (no common loss range: extrapolated)" if extrapolated else ""))
        print(f"compute multiplier {family} vs dense with one exponent for both (alpha_C {alpha:.4f}): "
              f"{shared:.3f} [{shared_ci[0]:.3f}, {shared_ci[1]:.3f}] at every loss")
    if args.plot:
        plot(result, args.plot, args.loss)
        print(f"scaling: plot -> {args.plot}")
    for fam in result["fits"].values():
        for f in fam.values():
            f.pop("boot")
    print(json.dumps(result))
    return result


def plot(result: dict, path: str, loss_key: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    laws = [("N", "non-embedding parameters N"), ("D", "tokens D (largest model)"), ("C", "training FLOPs C (frontier)")]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (family, fits) in enumerate(result["fits"].items()):
        color = colors[i % len(colors)]
        for ax, (law, label) in zip(axes, laws):
            f = fits.get(law)
            if f is None:
                continue
            x, y = np.array(f["points"]).T
            ax.loglog(x, y, "o", color=color, label=f"{family}")
            xs = np.geomspace(x.min() / 1.5, x.max() * 1.5, 50)
            ax.loglog(xs, f["E"] + (f["x_c"] / xs) ** f["alpha"], "-", color=color,
                      label=f"{family} fit: alpha={f['alpha']:.3f}")
            if law == "N" and "N_active" in fits:
                fa = fits["N_active"]
                xa, ya = np.array(fa["points"]).T
                ax.loglog(xa, ya, "s", mfc="none", color=color, label=f"{family} vs N_active")
                xs = np.geomspace(xa.min() / 1.5, xa.max() * 1.5, 50)
                ax.loglog(xs, fa["E"] + (fa["x_c"] / xs) ** fa["alpha"], ":", color=color,
                          label=f"{family} (N_active) fit: alpha={fa['alpha']:.3f}")
            ax.set_xlabel(label)
    from matplotlib.ticker import FormatStrFormatter, NullFormatter

    for ax in axes:
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2f"))  # losses span well under a decade
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2f"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_ylabel(loss_key)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sw = sub.add_parser("sweep", help="write the configs of a family of sizes and train them")
    sw.add_argument("--family", required=True, choices=sorted(FAMILY_BASE))
    sw.add_argument("--base", default="", help="preset or YAML the sizes are derived from (default: per family)")
    sw.add_argument("--sizes", default="", help="DxL[xH],... : d_model x n_layers [x n_heads]")
    sw.add_argument("--target-n", default="", help="non-embedding parameter counts, e.g. 1e5,3e5,1e6")
    sw.add_argument("--aspect", type=float, default=32.0, help="d_model / n_layers for --target-n")
    sw.add_argument("--head-dim", type=int, default=32, help="d_model / n_heads when heads are not given")
    sw.add_argument("--tokens", type=float, default=None, help="training tokens per run")
    sw.add_argument("--compute", type=float, default=None, help="training FLOPs per run (steps from flops_per_token)")
    sw.add_argument("--evals", type=int, default=8, help="evaluations per run (train.eval_every = steps / evals)")
    sw.add_argument("--out", default="runs/scaling")
    sw.add_argument("--launch", choices=["local", "inprocess", "print"], default="local")
    sw.add_argument("--launcher", default="", help="command prefix for the runs (default: python -m sparselm.train)")
    co = sub.add_parser("collect", help="results.csv and curves.csv from the finished runs of a sweep")
    co.add_argument("--out", default="runs/scaling")
    fi = sub.add_parser("fit", help="power-law fits, bootstrap intervals, plot and compute multiplier")
    fi.add_argument("--csv", default="runs/scaling/results.csv")
    fi.add_argument("--curves", default="", help="default: curves.csv beside --csv")
    fi.add_argument("--loss", default="val_loss", choices=["val_loss", "train_loss"], help="loss of L(N)")
    fi.add_argument("--irreducible", action="store_true", help="fit L = E + (x_c / x)^alpha for N and D")
    fi.add_argument("--bootstrap", type=int, default=1000)
    fi.add_argument("--skip-early", type=float, default=0.2,
                    help="L(D), L(C): leave out evaluations before this fraction of each run's steps")
    fi.add_argument("--plot", default="")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "sweep":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command == "sweep":
        return sweep(args, extra)
    if args.command == "collect":
        return collect(Path(args.out))
    return fit(args)


if __name__ == "__main__":
    main(sys.argv[1:])
