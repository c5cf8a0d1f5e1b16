"""Test helpers: tiny configs, running the trainer and tools as real subprocesses, reading metrics."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
BIN = Path(PYTHON).parent

# The smallest model that still exercises every part of the loop.
TINY = ["--config", "tiny_dense", "--model.d_model=64", "--model.n_layers=2", "--model.n_heads=2",
        "--data.seq_len=32", "--model.max_seq_len=32", "--train.global_batch_size=8", "--train.progress=false",
        "--train.tensorboard=false", "--train.eval_every=0", "--train.log_every=1"]


# Rendezvous variables a trainer run in this process (sparselm.train.main, tools/scaling.py --launch inprocess)
# leaves behind for its world of one: a child launched with them would rejoin that world's port.
RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def subprocess_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in RENDEZVOUS}
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_cmd(cmd: list[str], check: bool = True, timeout: int = 600, cwd=REPO) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-6000:]}")
    return proc


def train(args: list[str], launcher: list[str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run sparselm.train: as a plain process, or under a launcher (torchrun / deepspeed) given as argv prefix."""
    if launcher:
        return run_cmd(launcher + args, check=check)
    return run_cmd([PYTHON, "-m", "sparselm.train", *args], check=check)


def torchrun(n: int) -> list[str]:
    return [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={n}", "-m", "sparselm.train"]


def deepspeed_launcher(n: int) -> list[str]:
    """The deepspeed launcher on a free port (its default, 29500, would be shared by tests run side by side)."""
    from sparselm.training.runtime import free_port

    return [str(BIN / "deepspeed"), "--num_gpus", str(n), "--master_port", str(free_port()), "--module", "sparselm.train"]


def rel_error(a, b) -> float:
    """||a - b|| / ||b|| in float64: how far a result is from its reference, whatever the scale."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def checkpoint_tensors(ckpt: Path) -> dict:
    """Every model tensor of a checkpoint directory, whole, by canonical name (any format)."""
    from sparselm.checkpoint.checkpointing import open_model_tensors, read_meta

    return dict(open_model_tensors(Path(ckpt), read_meta(Path(ckpt))).items())
