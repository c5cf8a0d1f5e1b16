"""A process killed at any moment during a save leaves the previous checkpoint loadable."""
import signal
import subprocess
import time

import torch

from conftest import PYTHON, REPO, subprocess_env
from sparselm.checkpoint import latest_checkpoint, load_model


def test_sigkill_during_save_leaves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    for delay in (0.05, 0.13, 0.31):
        proc = subprocess.Popen([PYTHON, str(REPO / "tests" / "crash_saver.py"), str(out)], cwd=REPO,
                                env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # wait for the first complete save of this round, then kill at an arbitrary point of a later one
        assert any(line.startswith("saved") for line in proc.stdout), "the helper never saved"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        ckpt = latest_checkpoint(out)
        assert ckpt is not None
        model, cfg = load_model(ckpt)  # loads whole: every file present and intact
        assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, cfg.model.vocab_size)
    assert len(list((out / "checkpoints").glob("step_*"))) <= 3  # keep_last=2, plus at most one being replaced
