"""Stopping early without losing work: signals end the run after a step with a checkpoint (exit 75), a
second signal ends it at once, and `checkpoints/latest` always names a complete checkpoint."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
import torch

from support.run import PYTHON, REPO, TINY, subprocess_env, train
from sparselm.training.metrics import read_metrics
from sparselm.checkpoint.checkpointing import latest_checkpoint, load_model, read_meta
from sparselm.training.preemption import REQUEUE_EXIT, StopGuard


def _start(out, extra=()) -> subprocess.Popen:
    return subprocess.Popen([PYTHON, "-m", "sparselm.train", *TINY, "--train.steps=100000", "--train.save_every=1",
                             "--train.keep_last=2", "--train.resume=latest", f"--train.out_dir={out}", *extra],
                            cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for_save(proc: subprocess.Popen) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("saved"):
            return lines
    raise AssertionError("the run never saved:\n" + "".join(lines[-40:]))


def test_signal_during_saves_finishes_the_save_and_exits_75(tmp_path):
    """Every step saves (save_every=1), so the signal lands in or next to a save: the save completes, the
    run stops after that step with status 75, and resuming continues with one metrics line per step."""
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_save(proc)
    time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT, rest[-3000:]
    stopped = int(rest.split("stopped at step ")[1].split("/")[0])
    latest = latest_checkpoint(out)
    assert read_meta(latest)["step"] == stopped
    model, cfg = load_model(latest)  # every file present and intact
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, cfg.model.vocab_size)
    assert not list((out / "checkpoints").glob(".tmp_*")), "no half-written checkpoint left behind"
    assert [r["step"] for r in read_metrics(out)] == list(range(1, stopped + 1))

    # the same command again continues from there; max_minutes (about 0.1 s here) stops it once more
    proc = _start(out, ["--train.max_minutes=0.002"])
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == REQUEUE_EXIT, rest[-3000:]
    assert f"resumed from {out / 'checkpoints' / f'step_{stopped}'}" in rest
    assert "train.max_minutes=0.002 reached" in rest
    again = read_meta(latest_checkpoint(out))["step"]
    assert again > stopped
    assert [r["step"] for r in read_metrics(out)] == list(range(1, again + 1))


def test_second_signal_exits_at_once_and_latest_stays_complete(tmp_path):
    out = tmp_path / "run"
    proc = _start(out)
    _wait_for_save(proc)
    proc.send_signal(signal.SIGTERM)
    for line in proc.stdout:  # two signals sent back to back would reach Python's handler as one
        if line.startswith("sparselm: got SIGTERM"):
            break
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM  # died of the second signal, without saving again
    latest = latest_checkpoint(out)
    assert latest is not None and (latest / "meta.json").is_file()
    load_model(latest)


def test_stop_guard_decisions():
    """In-process, no process group: flags from a signal, max_minutes and save_every_minutes."""
    guard = StopGuard(save_every_minutes=0, max_minutes=0, say=lambda line: None)
    try:
        assert guard.check() == (False, "")
        os.kill(os.getpid(), signal.SIGUSR1)
        assert guard.check() == (True, "asked to stop")
    finally:
        guard.close()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL  # handlers put back
    guard = StopGuard(save_every_minutes=1e-6, max_minutes=1e-6, say=lambda line: None)
    guard.close()
    time.sleep(0.01)
    assert guard.check() == (True, "train.max_minutes=1e-06 reached")
    guard = StopGuard(save_every_minutes=1e-6, max_minutes=0, say=lambda line: None)
    guard.close()
    time.sleep(0.01)
    assert guard.check() == (True, "")
    guard.saved()
    guard.save_every_s = 60.0
    assert guard.check() == (False, "")


def test_time_settings_are_validated(tmp_path):
    proc = train(TINY + ["--train.max_minutes=-1", f"--train.out_dir={tmp_path}"], check=False)
    assert proc.returncode == 2 and "train.max_minutes must be >= 0" in proc.stderr
