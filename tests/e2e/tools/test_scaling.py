"""tools/scaling.py: power-law fits on synthetic data with noise, and a sweep of two micro sizes end to end."""
from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest

from tools import scaling


def noisy(values, sigma: float, seed: int) -> np.ndarray:
    return values * np.exp(np.random.default_rng(seed).normal(0.0, sigma, len(values)))


def test_fit_recovers_exponent_and_constant():
    n = np.geomspace(1e5, 1e9, 24)
    loss = noisy((8.8e13 / n) ** 0.076, 0.003, seed=1)  # Kaplan's L(N)
    f = scaling.fit_power_law(n, loss)
    assert f["alpha"] == pytest.approx(0.076, rel=0.02)
    assert f["x_c"] == pytest.approx(8.8e13, rel=0.15)
    ci = scaling.bootstrap(n, loss, False, 200)
    assert ci["alpha"][0] <= f["alpha"] <= ci["alpha"][1]
    assert ci["alpha"][0] <= 0.076 <= ci["alpha"][1]


def test_fit_recovers_irreducible_term():
    n = np.geomspace(1e6, 1e10, 24)
    loss = noisy(1.69 + (4.8e7 / n) ** 0.34, 0.002, seed=2)  # Chinchilla's E and alpha
    f = scaling.fit_power_law(n, loss, irreducible=True)
    assert f["alpha"] == pytest.approx(0.34, rel=0.02)
    assert f["E"] == pytest.approx(1.69, rel=0.02)
    assert f["x_c"] == pytest.approx(4.8e7, rel=0.15)
    plain = scaling.fit_power_law(n, loss)  # without E the exponent is badly off: the term matters
    assert abs(plain["alpha"] / 0.34 - 1) > 0.2


def test_frontier_keeps_only_improving_points():
    pts = [(1.0, 5.0), (2.0, 4.0), (3.0, 4.5), (4.0, 3.0), (5.0, 3.0)]
    assert scaling.frontier(pts) == [(1.0, 5.0), (2.0, 4.0), (4.0, 3.0)]


def write_rows(path, rows):
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_fit_cli_compute_multiplier_and_plot(tmp_path, capsys):
    """Two synthetic families where the sparse one reaches every loss with 2.5x less compute."""
    results, curves = [], []
    for family, shift in (("dense", 1.0), ("moe", 2.5)):
        for i, n in enumerate(np.geomspace(1e5, 1e7, 5)):
            run = f"{family}{i}"
            c = np.geomspace(1e12, 1e16, 6) * (n / 1e5)
            loss = noisy((3.1e8 * 8.64e19 / (c * shift)) ** 0.05, 0.001, seed=i)
            for cc, ll in zip(c, loss):
                curves.append({"family": family, "run": run, "N": n, "N_active": n / 2, "step": 1, "D": cc / (6 * n),
                               "C": cc, "val_loss": ll})
            results.append({"family": family, "run": run, "steps": 1, "N": n, "N_active": n if family == "dense" else n / 4,
                            "D": c[-1] / (6 * n), "C": c[-1], "train_loss": loss[-1], "val_loss": loss[-1]})
    write_rows(tmp_path / "results.csv", results)
    write_rows(tmp_path / "curves.csv", curves)
    png = tmp_path / "plot.png"
    out = scaling.main(["fit", "--csv", str(tmp_path / "results.csv"), "--bootstrap", "100", "--plot", str(png)])
    assert out["fits"]["dense"]["C"]["alpha"] == pytest.approx(0.05, rel=0.02)
    assert out["fits"]["moe"]["C"]["alpha"] == pytest.approx(0.05, rel=0.02)
    m = out["compute_multiplier"]["moe"]
    assert m["multiplier"] == pytest.approx(2.5, rel=0.05)
    assert m["ci"][0] <= m["multiplier"] <= m["ci"][1]
    assert m["shared_multiplier"] == pytest.approx(2.5, rel=0.05)
    assert m["shared_ci"][0] <= m["shared_multiplier"] <= m["shared_ci"][1]
    assert "N_active" in out["fits"]["moe"] and "N_active" not in out["fits"]["dense"]
    assert png.stat().st_size > 10_000
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last)["compute_multiplier"]["moe"]["multiplier"] == pytest.approx(m["multiplier"])


def test_sweep_two_micro_sizes_end_to_end(tmp_path):
    """Writes the configs, trains both sizes, collects the CSVs, fits them; every logged step carries the
    FLOP fields of sparselm.planning.flops (no mfu on CPU)."""
    out = tmp_path / "sweep"
    micro = ["--data.seq_len=32", "--model.max_seq_len=32", "--train.global_batch_size=8", "--train.eval_batches=1",
             "--train.progress=false", "--train.tensorboard=false", "--train.log_every=1"]
    rows = scaling.main(["sweep", "--family", "dense", "--sizes", "32x1x1,64x2x2", "--tokens", "1536", "--evals", "2",
                         "--out", str(out), "--launch", "inprocess", *micro])
    assert [r["run"] for r in rows] == ["dense_d32_l1", "dense_d64_l2"]
    assert rows[0]["N"] < rows[1]["N"] and rows[0]["D"] == rows[1]["D"] == 6 * 8 * 32
    for row in rows:
        assert row["C"] == pytest.approx(row["flops_per_token"] * row["D"])
        metrics = [json.loads(line) for line in (out / "runs" / row["run"] / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "lm_loss" in m]
        assert len(steps) == 6 and all(m["flops_per_token"] == row["flops_per_token"] for m in steps)
        for m in steps:
            assert m["tflops"] == pytest.approx(m["flops_per_token"] * m["tokens_per_s"] / 1e12)
            assert "mfu" not in m
    with open(out / "curves.csv") as fh:
        assert len(list(csv.DictReader(fh))) == 2 * 3  # step 0, 3 and 6 of each run
    again = scaling.main(["sweep", "--family", "dense", "--sizes", "32x1x1,64x2x2", "--tokens", "1536", "--evals", "2",
                          "--out", str(out), "--launch", "inprocess", *micro])  # finished runs are kept
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in rows]
    fitted = scaling.main(["fit", "--csv", str(out / "results.csv"), "--bootstrap", "20"])
    assert math.isfinite(fitted["fits"]["dense"]["N"]["alpha"])


def test_sweep_print_writes_configs_and_commands(tmp_path, capsys):
    from sparselm.config import load_config
    from sparselm.planning.flops import param_counts

    out = tmp_path / "p"
    scaling.main(["sweep", "--family", "pkm", "--target-n", "3e6,6e6", "--compute", "1e13", "--out", str(out),
                  "--launch", "print", "--launcher", "sbatch slurm/train.sbatch"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("sbatch slurm/train.sbatch --config ") for line in lines)
    configs = sorted((out / "configs").glob("*.yaml"), key=lambda p: param_counts(load_config(str(p))).non_embedding)
    sizes = [param_counts(load_config(str(p))).non_embedding for p in configs]
    assert sizes[0] < sizes[1]
    for path in configs:
        cfg = load_config(str(path))
        assert cfg.model.layer_kinds().count("pkm") == 1
