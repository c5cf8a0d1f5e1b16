"""A process killed at any moment during a save leaves the previous checkpoint loadable."""
import signal
import subprocess
import time

import json

import pytest
import torch

from support.run import PYTHON, REPO, subprocess_env
from sparselm.checkpoint.checkpointing import clean_stale, publish, latest_checkpoint, load_model


@pytest.mark.parametrize("mode, delays", [("sync", (0.05, 0.13, 0.31)), ("async", (0.02, 0.21))])
def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path, mode, delays):
    out = tmp_path / "run"
    for delay in delays:
        proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "support" / "crash_saver.py"), str(out), mode], cwd=REPO,
                                env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # wait for the first complete save of this round, then kill at an arbitrary point of a later one
        saves = (line for line in proc.stdout if line.startswith("saved"))
        for _ in range(2 if mode == "async" else 1):  # async: the second save starts once the first is complete
            assert next(saves, None), "the helper never saved"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(out)
        assert ckpt is not None
        model, cfg = load_model(ckpt)  # loads whole: every file present and intact
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, cfg.model.vocab_size)
    assert len(list((out / "checkpoints").glob("step_*"))) <= 3  # keep_last=2, plus at most one being replaced


def _fake_checkpoint(path, step):
    path.mkdir(parents=True)
    (path / "weights").write_text(str(step))
    (path / "meta.json").write_text(json.dumps({"step": step}))


def test_replacing_a_step_never_leaves_latest_dangling(tmp_path):
    """Re-saving step 4 (e.g. after resuming at 4): at every point of the swap a complete checkpoint is found,
    and the next save puts back what a crash left set aside."""
    ckdir = tmp_path / "checkpoints"
    _fake_checkpoint(ckdir / "step_2", 2)
    _fake_checkpoint(ckdir / "step_4", 4)
    (ckdir / "latest").write_text("step_4\n")
    # a crash right after the old step_4 was set aside, before the new one was renamed in
    (ckdir / "step_4").rename(ckdir / ".old_step_4")
    _fake_checkpoint(ckdir / ".tmp_step_4", 40)
    assert latest_checkpoint(tmp_path) == ckdir / ".old_step_4"
    clean_stale(ckdir)  # what the next save does first
    assert not (ckdir / ".tmp_step_4").exists() and (ckdir / "step_4" / "weights").read_text() == "4"
    assert latest_checkpoint(tmp_path) == ckdir / "step_4"
    # the whole swap
    _fake_checkpoint(ckdir / ".tmp_step_4", 40)
    publish(ckdir, ckdir / ".tmp_step_4", ckdir / "step_4", keep_last=2)
    assert latest_checkpoint(tmp_path) == ckdir / "step_4"
    assert (ckdir / "step_4" / "weights").read_text() == "40"
    assert sorted(p.name for p in ckdir.iterdir()) == ["latest", "step_2", "step_4"]
