"""A new user's first hour: start-up checks before any heavy import, no silent starts, one line per
step after a resume, readable files, quiet logs."""
import json
import os
import stat

import pytest

from sparselm.training.metrics import read_metrics
from support.bpe import bpe_dataset
from support.run import PYTHON, TINY, run_cmd, torchrun, train

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
                                  "world size", "no config", "small validation", "changed model"])
def test_start_up_checks_run_before_deepspeed_or_megatron_is_imported(tmp_path, small_dataset, resumed_run, case):
    taken = tmp_path / "taken"
    (taken / "checkpoints" / "step_1").mkdir(parents=True)
    (taken / "checkpoints" / "step_1" / "meta.json").write_text("{}")
    (taken / "checkpoints" / "latest").write_text("step_1\n")
    args, world, words = {
        "missing dataset": (["--data.dataset=/nonexistent/corpus"], None, "dataset file '/nonexistent/corpus.bin' does not exist"),
        "missing resume": (["--train.resume=/nonexistent/ckpt"], None, "'/nonexistent/ckpt' does not exist"),
        "taken out_dir": ([f"--train.out_dir={taken}"], None, "already holds checkpoints"),
        "too little data": ([f"--data.dataset={small_dataset}", "--train.steps=50"], None, "enough for 2 more steps"),
        "world size": (["--parallel.tp=3"], 2, "world size 2 is not divisible by parallel.tp * parallel.pp = 3; "
                                               "launch a multiple of 3 processes; and parallel.tp=3 must divide "
                                               "model.n_heads=2"),
        "no config": (None, None, "no --config given"),
        "small validation": ([f"--data.valid_dataset={small_dataset}", "--data.seq_len=1024", "--model.max_seq_len=1024",
                              "--train.eval_every=1"], None, "give a larger data.valid_dataset or set train.eval_every=0"),
        "changed model": ([f"--train.resume={resumed_run[0] / 'checkpoints' / 'step_2'}", "--model.d_model=32"], None,
                          "model.d_model=32 differs from 64 in the checkpoint being resumed"),
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
    files = [f for f in (run / "checkpoints" / "step_4").rglob("*") if f.is_file()]
    assert any(f.suffix == ".safetensors" for f in files)
    for f in files:
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


# ------------------------------------------------------------------------ self-contained checkpoints
@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
    """A run on a locally trained BPE tokenizer given by a relative path, as a user would type it."""
    root = tmp_path_factory.mktemp("bpe")
    prefix = bpe_dataset(root)
    run_cmd([PYTHON, "-m", "sparselm.train", *TINY, "--train.steps=2", "--train.global_batch_size=2",
             "--data.tokenizer=tok/tokenizer.json", f"--data.dataset={prefix}", f"--data.valid_dataset={prefix}",
             "--data.seq_len=16", "--model.max_seq_len=16", f"--train.out_dir={root / 'run'}"], cwd=root)
    return root


def test_a_checkpoint_carries_its_tokenizer(bpe_run, tmp_path):
    import sparselm

    ckpt = bpe_run / "run" / "checkpoints" / "step_2"
    assert (ckpt / "tokenizer.json").read_bytes() == (bpe_run / "tok" / "tokenizer.json").read_bytes()
    tok = sparselm.load_tokenizer(bpe_run / "run")
    assert tok.decode(tok.encode("return a + b")) == "return a + b" and tok.name.startswith("bpe-")
    # from another directory, where the relative data.tokenizer path means nothing
    proc = run_cmd([PYTHON, "-m", "sparselm.generate", "--ckpt", str(bpe_run / "run"), "--prompt", "def ",
                    "--max-new-tokens", "5"], cwd=tmp_path, check=False)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("which", ["byte", "bpe"])
def test_export_hf_writes_a_tokenizer_that_transformers_loads_and_that_encodes_as_ours(bpe_run, resumed_run,
                                                                                      tmp_path, which):
    transformers = pytest.importorskip("transformers", reason="transformers is an optional extra (make setup installs it)")
    import sparselm
    from tools.convert_checkpoint import main as convert

    run = bpe_run / "run" if which == "bpe" else resumed_run[0]
    convert(["export-hf", "--input", str(run), "--output", str(tmp_path / "hf")])
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    ours = sparselm.load_tokenizer(run)
    sample = "def add(a, b):\n    return a + b  # héllo ✓\n"
    assert hf.encode(sample, add_special_tokens=False) == ours.encode(sample)
    assert hf.eos_token_id == ours.eod_id
    assert hf.decode(ours.encode(sample)) == sample


# ------------------------------------------------------------------------ evaluation and plots
def test_evaluate_reports_loss_bits_per_byte_and_loss_by_position(resumed_run, tmp_path):
    from sparselm.evaluate import main as evaluate

    run, _, _ = resumed_run
    result = evaluate(["--ckpt", str(run), "--batches", "2", "--batch-size", "4", "--out", str(tmp_path / "e.json"),
                       "--plot", str(tmp_path / "new" / "positions.png")])  # a parent directory is made
    assert result["samples"] == 8 and result["tokens"] == 8 * 32 and len(result["loss_by_position"]) == 32
    assert result["loss"] == pytest.approx(sum(result["loss_by_position"]) / 32, rel=1e-5)
    # byte tokenizer: one byte per token except end-of-document, so bpb = loss / ln 2 * tokens / bytes
    import math
    assert result["bits_per_byte"] == pytest.approx(result["loss"] / math.log(2) * result["tokens"] / result["bytes"],
                                                    rel=1e-5)
    assert result["bytes"] <= result["tokens"]
    assert json.loads((tmp_path / "e.json").read_text())["loss"] == result["loss"]
    assert (tmp_path / "new" / "positions.png").stat().st_size > 1000


def test_evaluate_on_another_dataset_and_its_errors(bpe_run, tmp_path):
    proc = run_cmd([PYTHON, "-m", "sparselm.evaluate", "--ckpt", str(bpe_run / "run"), "--data",
                    str(bpe_run / "data" / "c"), "--batches", "1", "--batch-size", "2"])
    assert json.loads(proc.stdout.strip().splitlines()[-1])["samples"] == 2
    assert "Transformer Engine" not in proc.stderr and "Setting accelerator" not in proc.stdout + proc.stderr
    proc = run_cmd([PYTHON, "-m", "sparselm.evaluate", "--ckpt", str(bpe_run / "run"), "--data", "/nonexistent/x"],
                   check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr


def test_evaluate_names_an_empty_validation_split(bpe_run, tmp_path, capsys):
    """A dataset of one large document holds none out at data.valid_fraction: evaluate says so and points at --data."""
    from sparselm.evaluate import main as evaluate

    prefix = bpe_run / "data" / "c"  # one .txt file: one document, which data.valid_fraction=0.02 does not hold out
    run_cmd([PYTHON, "-m", "sparselm.train", *TINY, "--train.steps=1", "--train.global_batch_size=2",
             f"--data.tokenizer={bpe_run / 'tok' / 'tokenizer.json'}", f"--data.dataset={prefix}",
             "--data.seq_len=16", "--model.max_seq_len=16", f"--train.out_dir={tmp_path / 'run'}"])
    with pytest.raises(SystemExit) as exit_:
        evaluate(["--ckpt", str(tmp_path / "run"), "--batches", "1", "--batch-size", "2"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "validation split is empty" in err and "data.valid_fraction=0.02" in err and "--data PREFIX" in err
    assert "--seq-len" not in err


def test_tools_stop_bad_input_in_one_line(tmp_path):
    proc = run_cmd([PYTHON, "tools/train_tokenizer.py", "--input", str(tmp_path / "nothing"), "--output",
                    str(tmp_path / "t.json")], check=False)
    assert proc.returncode == 2 and "matches no file" in proc.stderr and "Traceback" not in proc.stderr


def test_the_default_corpus_validates_on_data_valid_dataset_when_given(small_dataset):
    from sparselm.config import load_config
    from sparselm.data.loader import build_datasets, pack_dataset
    from sparselm.data.tokenizer import ByteTokenizer

    cfg = load_config("tiny_dense", [f"--data.valid_dataset={small_dataset}", "--data.seq_len=32", "--model.max_seq_len=32"])
    _, valid = build_datasets(cfg.data, ByteTokenizer())  # was silently the default held-out split
    assert len(valid) == len(pack_dataset(small_dataset, 32))


def test_plot_run_draws_loss_and_layer_panels(resumed_run, tmp_path):
    from tools.plot_run import main as plot_run

    moe = tmp_path / "moe"
    train(["--config", "tiny_moe", "--train.steps=2", "--train.eval_every=1", "--model.n_layers=2",
           "--train.global_batch_size=4", "--data.seq_len=32", "--model.max_seq_len=32",
           "--train.tensorboard=false", f"--train.out_dir={moe}"])
    panels = plot_run([str(resumed_run[0]), str(moe), "--out", str(tmp_path / "runs.png")])
    assert panels[:2] == ["loss against steps", "loss against tokens"]
    assert "MoE load imbalance (max load x E)" in panels
    assert (tmp_path / "runs.png").stat().st_size > 1000


def test_partial_validation_batch_is_evaluated(tmp_path, small_dataset):
    # 22 samples of 32 tokens: the held-out share of a one-document dataset is empty, so validate on a
    # dataset of 3 samples, fewer than one micro-batch of 8
    from tools.preprocess_data import main as preprocess

    (tmp_path / "v.txt").write_text("x" * 100)
    valid = preprocess(["--input", str(tmp_path / "v.txt"), "--output-prefix", str(tmp_path / "v")])[0]
    train(TINY + ["--train.steps=1", "--train.eval_every=1", f"--data.dataset={small_dataset}",
                  f"--data.valid_dataset={valid}", f"--train.out_dir={tmp_path / 'run'}"])
    assert any("val_loss" in r for r in read_metrics(tmp_path / "run"))


def test_weights_and_biases_sink_works_offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="wandb is an optional extra (make setup installs it)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    train(TINY + ["--train.steps=1", "--train.wandb_project=sparselm-test", f"--train.out_dir={tmp_path}"])
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))
