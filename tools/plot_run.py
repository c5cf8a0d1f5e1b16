#!/usr/bin/env python
"""Plot one or several runs: ``python tools/plot_run.py RUN_DIR [RUN_DIR ...] --out FILE.png``.

Panels: training and validation loss against optimizer steps and against tokens seen; the MoE load
imbalance (``layer*/load_max``) and PKM slot usage (``layer*/pkm_read_frac``) when the runs log them.
Reads each run's metrics.jsonl and config.yaml (tokens per step = global batch x sequence length).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from sparselm.training.metrics import read_metrics


def read_run(run_dir: Path) -> dict:
    """{"name", "rows", "tokens_per_step"} of a run directory; raises FileNotFoundError naming the file."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"'{metrics}' does not exist; give run directories made by sparselm.train")
    rows = read_metrics(run_dir)
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else {}
    per_step = cfg.get("train", {}).get("global_batch_size", 0) * cfg.get("data", {}).get("seq_len", 0)
    return {"name": run_dir.name, "rows": rows, "tokens_per_step": per_step}


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def layer_keys(runs: list[dict], suffix: str) -> list[str]:
    return sorted({k for run in runs for r in run["rows"] for k in r if k.startswith("layer") and k.endswith(suffix)})


def plot(runs: list[dict], out: str) -> list[str]:
    """Write the figure; returns the panel titles drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("loss against steps", None), ("loss against tokens", None)]
    for title, suffix in (("MoE load imbalance (max load x E)", "/load_max"), ("PKM slots read in window", "/pkm_read_frac")):
        if layer_keys(runs, suffix):
            panels.append((title, suffix))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (title, suffix) in zip(axes[0], panels):
        for run in runs:
            if suffix is None:
                scale = run["tokens_per_step"] if title.endswith("tokens") else 1
                for key, style in (("loss", "-"), ("val_loss", "o--")):
                    xs, ys = _series(run["rows"], key)
                    if xs:
                        ax.plot([x * scale for x in xs], ys, style, label=f"{run['name']} {key}", markersize=3)
            else:
                for key in layer_keys([run], suffix):
                    xs, ys = _series(run["rows"], key)
                    ax.plot(xs, ys, label=f"{run['name']} {key.split('/')[0]}")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("tokens" if title.endswith("tokens") else "step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return [t for t, _ in panels]


def main(argv: list[str] | None = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    try:
        runs = [read_run(Path(r)) for r in args.runs]
    except FileNotFoundError as err:
        parser.exit(2, f"plot_run.py: error: {err}\n")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    panels = plot(runs, args.out)
    print(f"wrote {args.out}: {', '.join(panels)}")
    return panels


if __name__ == "__main__":
    main(sys.argv[1:])
