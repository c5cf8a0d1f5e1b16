"""Metric sinks (rank 0 only): metrics.jsonl, TensorBoard, Weights & Biases (optional), and one
fixed-format console line."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def read_metrics(run_dir: str | Path, train_only: bool = False) -> list[dict]:
    """The records of a run directory's metrics.jsonl, in file order (one dict per logged step; eval lines
    carry ``val_loss``).  ``train_only``: only the lines with a training ``loss``.  A run directory without
    the file (a run that never logged) gives []."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return [r for r in rows if "loss" in r] if train_only else rows


class MetricsWriter:
    """metrics.jsonl and TensorBoard.  ``resume_step``: the step a resumed run continues after; lines of later
    steps (logged after that checkpoint by the run that stopped) are dropped first, so every step keeps
    one line, and TensorBoard purges its events after that step."""

    def __init__(self, out_dir: Path, tensorboard: bool, enabled: bool, resume_step: int | None = None,
                 wandb_project: str = "", config: dict | None = None):
        self.enabled = enabled
        path = out_dir / METRICS_FILE
        if enabled and resume_step is not None and path.is_file():
            _keep_until(path, resume_step)
        self.jsonl = open(path, "a", encoding="utf-8") if enabled else None
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step)
        self.wandb = None
        if enabled and wandb_project:
            import wandb

            self.wandb = wandb.init(project=wandb_project, name=Path(out_dir).name, dir=str(out_dir), config=config,
                                    resume="allow")

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.tb is not None:
            step = record["step"]
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)
                elif isinstance(value, list):
                    for i, v in enumerate(value):
                        self.tb.add_scalar(f"{key}/{i}", v, step)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tb:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _keep_until(path: Path, step: int) -> None:
    """Rewrite a metrics.jsonl keeping the lines of steps <= ``step`` (atomically: a crash keeps the old file)."""
    kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
            if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


def format_line(record: dict, total_steps: int) -> str:
    """step 10/100 | loss 3.2100 | lm 3.2000 | aux 0.0100 | gnorm 0.90 | lr 1.00e-03 | 12,345 tok/s"""
    parts = [f"step {record['step']}/{total_steps}"]
    for key, label, fmt in (("loss", "loss", ".4f"), ("lm_loss", "lm", ".4f"), ("aux_loss", "aux", ".4f"),
                            ("grad_norm", "gnorm", ".3f"), ("lr", "lr", ".2e"), ("val_loss", "val", ".4f"),
                            ("val_ppl", "val_ppl", ".2f")):
        if key in record:
            parts.append(f"{label} {record[key]:{fmt}}")
    if "tokens_per_s" in record:
        parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
    if record.get("skipped"):
        parts.append("skipped (not finite)")
    return " | ".join(parts)
