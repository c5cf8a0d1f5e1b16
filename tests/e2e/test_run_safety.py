"""Nothing lost when a run goes wrong: divergence, a full disk, two runs on one directory, paths that work from
anywhere (issue 29).  Real runs: subprocesses where the exit status and the one printed line matter, in-process
(``sparselm.train.main(argv)`` raises instead of exiting) where only the behaviour does."""
from __future__ import annotations

import errno
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from support.run import PYTHON, REPO, TINY, checkpoint_tensors, run_cmd, subprocess_env, train
from sparselm.training.metrics import read_metrics

DIVERGE = ["--optim.lr=50", "--optim.grad_clip=0"]


def _inprocess(args):
    from sparselm.train import main

    return main(args)


def _ckpt_steps(run: Path) -> list[int]:
    return sorted(int(p.name.split("_")[1]) for p in (run / "checkpoints").glob("step_*"))


# ------------------------------------------------------------------------------------------ divergence
@pytest.mark.parametrize("ds_config", ["zero1", "zero0"])  # DeepSpeed's own overflow skip; our guard without ZeRO
def test_divergence_stops_without_saving_and_keeps_the_last_good_checkpoint(tmp_path, ds_config):
    run = tmp_path / "run"
    proc = train(TINY + DIVERGE + [f"--parallel.ds_config={ds_config}", "--train.steps=40", "--train.save_every=1",
                                   "--train.keep_last=1", f"--train.out_dir={run}"], check=False)
    assert proc.returncode == 65, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("sparselm: error:")]
    assert "training diverged" in line and "train.skip_batches=" in line and "--train.resume=" in line, line
    rows = read_metrics(run)
    skipped = [r["step"] for r in rows if r.get("skipped")]
    first_bad = min(skipped)
    assert skipped == list(range(first_bad, rows[-1]["step"] + 1)) and len(skipped) == 3  # the default streak
    assert all(not math.isfinite(r["grad_norm"]) for r in rows if r.get("skipped"))
    # the skipped updates were not applied: weights never became non-finite, so every loss stayed finite
    assert all(math.isfinite(r["loss"]) for r in rows), [r["loss"] for r in rows]
    kept = _ckpt_steps(run)
    assert kept and max(kept) < first_bad, (kept, first_bad)  # nothing saved after the first skipped step
    assert f"checkpoints/step_{max(kept)}" in line
    tensors = checkpoint_tensors(run / "checkpoints" / f"step_{max(kept)}")
    assert all(t.isfinite().all() for t in tensors.values())


def test_a_resume_skips_the_batches_once_and_deterministically(tmp_path):
    gbs = 8
    _inprocess(TINY + ["--train.steps=2", f"--train.out_dir={tmp_path / 'run'}"])
    good = tmp_path / "run" / "checkpoints" / "step_2"
    losses = []
    for attempt, skip in (("a", 3), ("b", 3), ("plain", 0)):
        _inprocess(TINY + [f"--train.out_dir={tmp_path / attempt}", f"--train.resume={good}",
                           f"--train.skip_batches={skip}", "--train.steps=4"])
        losses.append([(r["step"], r["loss"]) for r in read_metrics(tmp_path / attempt)])
        meta = json.loads((tmp_path / attempt / "checkpoints" / "step_4" / "meta.json").read_text())
        assert meta["sampler"]["skipped"] == skip and meta["sampler"]["consumed"] == (4 + skip) * gbs
    assert losses[0] == losses[1] and losses[0] != losses[2]  # the same batches again; others than without skipping
    # a requeue with the same command resumes from the new checkpoint and does not skip again
    _inprocess(TINY + [f"--train.out_dir={tmp_path / 'a'}", "--train.resume=latest", "--train.skip_batches=3",
                       "--train.steps=5"])
    meta = json.loads((tmp_path / "a" / "checkpoints" / "step_5" / "meta.json").read_text())
    assert meta["sampler"]["consumed"] == (5 + 3) * gbs


# ------------------------------------------------------------------------------------------ disk errors
@pytest.mark.parametrize("async_save", [False, True])
def test_a_failing_write_removes_its_partial_checkpoint_and_keeps_latest(tmp_path, monkeypatch, async_save):
    """A writer that fails after some bytes (the failure of a full disk, a quota, an I/O error)."""
    from sparselm.checkpoint import shards as checkpoint_shards
    from sparselm.errors import SaveError

    real, calls = checkpoint_shards._ShardWriter.write_data, {"n": 0}

    def failing(self, plan, planner):
        calls["n"] += 1
        if calls["n"] > 2:  # the first checkpoint (model + optimizer) is written; the next one fails half-way
            (Path(self.path) / "partial.safetensors").write_bytes(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, plan, planner)

    monkeypatch.setattr(checkpoint_shards._ShardWriter, "write_data", failing)
    run = tmp_path / "run"
    with pytest.raises(SaveError) as err:
        _inprocess(TINY + ["--train.steps=6", "--train.save_every=2", f"--train.async_save={async_save}",
                           f"--train.out_dir={run}"])
    message = str(err.value)
    assert "No space left on device" in message and ".tmp_step_4" in message and "latest still names step_2" in message
    assert "\n" not in message
    ckdir = run / "checkpoints"
    assert not list(ckdir.glob(".tmp_step_*")), list(ckdir.iterdir())
    assert (ckdir / "latest").read_text().strip() == "step_2" and _ckpt_steps(run) == [2]
    checkpoint_tensors(ckdir / "step_2")  # complete and loadable


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"this machine refuses to mount a small tmpfs ({proc.stderr.strip()}); "
                    "the injected-failure test covers the same path")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_filesystem_is_one_line_exit_74_and_nothing_left_behind(small_disk):
    run = small_disk / "run"
    proc = train(TINY + ["--train.steps=8", "--train.save_every=2", "--train.keep_last=0", f"--train.out_dir={run}"],
                 check=False)
    assert proc.returncode == 74, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    [line] = [l for l in proc.stderr.splitlines() if l.startswith("sparselm: error:")]
    assert "[Errno 28] No space left on device" in line and "free" in line, line
    assert "warning: checkpoint" in proc.stdout  # the free-space check saw it coming
    ckdir = run / "checkpoints"
    assert not list(ckdir.glob(".tmp_step_*"))
    latest = (ckdir / "latest").read_text().strip()
    assert latest == f"step_{max(_ckpt_steps(run))}"
    checkpoint_tensors(ckdir / latest)


# ------------------------------------------------------------------------------------------ run lock
def test_a_second_run_on_the_same_directory_is_refused_and_a_killed_run_releases_it(tmp_path):
    from sparselm.errors import ConfigError

    run = tmp_path / "run"
    holder = subprocess.Popen([PYTHON, "-m", "sparselm.train", *TINY, "--train.steps=100000", f"--train.out_dir={run}"],
                              cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not (run / "metrics.jsonl").exists():  # it holds the lock from start-up; steps mean it is well under way
            assert holder.poll() is None and time.time() < deadline, holder.stdout.read()[-3000:]
            time.sleep(0.5)
        with pytest.raises(ConfigError, match=rf"is in use by another run \(host .*, pid {holder.pid}, started "):
            _inprocess(TINY + ["--train.steps=2", f"--train.out_dir={run}", "--train.resume=latest"])
        assert not (run / "checkpoints").exists()  # the refused run wrote nothing
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    _inprocess(TINY + ["--train.steps=2", f"--train.out_dir={run}", "--train.resume=latest"])  # not blocked
    assert (run / "checkpoints" / "step_2").is_dir()


# ------------------------------------------------------------------------------------------ paths
def test_a_run_trained_with_relative_paths_evaluates_and_resumes_from_elsewhere(tmp_path, monkeypatch):
    from sparselm.evaluate import main as evaluate_main
    from tools.preprocess_data import main as preprocess

    a, b = tmp_path / "a", tmp_path / "b"
    (a / "data").mkdir(parents=True)
    b.mkdir()
    text = "".join(f"def f{i}(x):\n    return x * {i} + {i * i}\n" for i in range(400))
    (a / "data" / "docs.jsonl").write_text("\n".join(json.dumps({"text": text[i:i + 700]})
                                                   for i in range(0, len(text), 700)) + "\n")
    monkeypatch.chdir(a)
    preprocess(["--input", "data/docs.jsonl", "--output-prefix", "data/docs", "--json-keys", "text", "--append-eod"])
    _inprocess(TINY + ["--data.dataset=data/docs", "--data.valid_dataset=data/docs", "--train.steps=2",
                       "--train.out_dir=run"])
    saved = (a / "run" / "config.yaml").read_text()
    assert f"dataset: {a / 'data' / 'docs'}" in saved and f"out_dir: {a / 'run'}" in saved
    monkeypatch.chdir(b)
    result = evaluate_main(["--ckpt", str(a / "run"), "--batches", "1", "--batch-size", "2"])
    assert math.isfinite(result["loss"])
    _inprocess(["--config", str(a / "run" / "config.yaml"), "--train.resume=latest", "--train.steps=3"])
    assert [r["step"] for r in read_metrics(a / "run")][-1] == 3
