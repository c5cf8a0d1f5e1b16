"""A new user's first hour: start-up checks before any heavy import, no silent starts, one line per
step after a resume, readable files, quiet logs."""
import json
import os
import stat

import pytest

from conftest import PYTHON, TINY, read_metrics, run_cmd, torchrun, train

PROBE = """
import sys
from sparselm.train import main
try:
    main(sys.argv[1:])
    print("STARTED")
except Exception as err:
    print("ERROR", type(err).__name__, err)
print("IMPORTED", [m for m in ("deepspeed", "megatron") if m in sys.modules])
"""


def _probe(args, world=None):
    env = ["env", f"WORLD_SIZE={world}"] if world else []
    proc = run_cmd([*env, PYTHON, "-c", PROBE, *args], check=False)
    return proc.stdout


@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory):
    from tools.preprocess_data import main

    root = tmp_path_factory.mktemp("data")
    (root / "doc.txt").write_text("a short document. " * 40)
    return main(["--input", str(root / "doc.txt"), "--output-prefix", str(root / "small"), "--append-eod"])[0]


@pytest.mark.parametrize("case", ["missing dataset", "missing resume", "taken out_dir", "too little data",
                                  "world size", "no config"])
def test_start_up_checks_run_before_deepspeed_or_megatron_is_imported(tmp_path, small_dataset, case):
    taken = tmp_path / "taken"
    (taken / "checkpoints" / "step_1").mkdir(parents=True)
    (taken / "checkpoints" / "step_1" / "meta.json").write_text("{}")
    (taken / "checkpoints" / "latest").write_text("step_1\n")
    args, world, words = {
        "missing dataset": (["--data.dataset=/nonexistent/corpus"], None, "dataset file '/nonexistent/corpus.bin' does not exist"),
        "missing resume": (["--train.resume=/nonexistent/ckpt"], None, "'/nonexistent/ckpt' does not exist"),
        "taken out_dir": ([f"--train.out_dir={taken}"], None, "already holds checkpoints"),
        "too little data": ([f"--data.dataset={small_dataset}", "--train.steps=50"], None, "enough for 2 more steps"),
        "world size": (["--parallel.tp=3"], 2, "world size 2 is not divisible by parallel.tp * parallel.pp = 3"),
        "no config": (None, None, "no --config given"),
    }[case]
    argv = ([] if args is None else TINY + [f"--train.out_dir={tmp_path / 'run'}"] + args)
    out = _probe(argv, world)
    assert words in out, out
    assert "IMPORTED []" in out, out  # refused before DeepSpeed or megatron-core was imported


def test_resume_latest_with_no_checkpoint_says_so(tmp_path):
    proc = train(TINY + ["--train.steps=1", "--train.resume=latest", f"--train.out_dir={tmp_path}"])
    assert f"no checkpoint in '{tmp_path / 'checkpoints'}' to resume: starting at step 0" in proc.stdout


@pytest.fixture(scope="module")
def resumed_run(tmp_path_factory):
    """4 steps with checkpoints at 2 and 4, then a restart from step 2 in the same directory (as after a
    crash that lost the later checkpoint), under umask 022."""
    run = tmp_path_factory.mktemp("resumed")
    old = os.umask(0o022)
    try:
        args = TINY + ["--train.steps=4", "--train.save_every=2", "--train.keep_last=0", f"--train.out_dir={run}"]
        first = train(args)
        again = train(args + [f"--train.resume={run / 'checkpoints' / 'step_2'}"])
    finally:
        os.umask(old)
    return run, first, again


def test_a_resumed_run_keeps_one_metrics_line_per_step(resumed_run):
    run, _, _ = resumed_run
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_files_follow_the_umask(resumed_run):
    run, _, _ = resumed_run
    for f in (run / "checkpoints" / "step_4").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f  # safetensors alone writes 0600


def test_logs_are_quiet_and_plain_when_not_a_terminal(resumed_run):
    _, first, _ = resumed_run
    text = first.stdout + first.stderr
    for noise in ("Transformer Engine and Apex", "Setting accelerator to CPU", "built successfully", "\r"):
        assert noise not in text, noise
    assert "step 4/4 | loss" in first.stdout  # a plain line per logged step instead of a progress bar


def test_an_error_is_printed_once_not_per_rank(tmp_path):
    proc = train(TINY + ["--data.dataset=/nonexistent/corpus", f"--train.out_dir={tmp_path}"],
                 launcher=torchrun(2), check=False)
    assert proc.returncode != 0
    assert (proc.stdout + proc.stderr).count("sparselm: error: dataset file") == 1


def test_a_folder_named_like_the_package_does_not_shadow_it(tmp_path):
    (tmp_path / "sparselm").mkdir()  # e.g. the clone itself, seen from its parent directory
    proc = run_cmd([PYTHON, "-c", "import sparselm, json; print(json.dumps(callable(sparselm.load_model)))"],
                   check=False, cwd=tmp_path)
    assert proc.returncode == 0 and json.loads(proc.stdout) is True, proc.stderr
