"""End-to-end training runs as real processes: plain, torchrun and the deepspeed launcher."""
import json
import shutil

import pytest
import torch

from support.run import PYTHON, TINY, deepspeed_launcher, run_cmd, torchrun, train
from sparselm.training.metrics import read_metrics


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short run shared by the tests that only read its outputs."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    train(TINY + ["--train.steps=30", "--train.eval_every=15", "--train.tensorboard=true", f"--train.out_dir={out}"])
    return out


def test_loss_falls_and_run_directory_is_complete(trained):
    rows = read_metrics(trained)
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 31))
    for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr", "tokens_per_s"):
        assert key in steps[0], key
    assert sum(r["loss"] for r in steps[-5:]) / 5 < steps[0]["loss"] - 1.0
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 15, 30]
    assert evals[2]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert (trained / "config.yaml").is_file()
    assert (trained / "checkpoints" / "latest").read_text().strip() == "step_30"
    assert any((trained / "tensorboard").iterdir())


def test_generation_from_checkpoint(trained):
    import sparselm
    from sparselm.generate import main as generate_main

    model, cfg = sparselm.load_model(trained)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, cfg.model.vocab_size)
    text = generate_main(["--ckpt", str(trained), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "1"])
    assert text.startswith("def ") and len(text) > 4
    again = generate_main(["--ckpt", str(trained / "checkpoints" / "step_30"), "--prompt", "def ",
                           "--max-new-tokens", "20", "--seed", "1"])
    assert again == text  # seeded sampling is reproducible


@pytest.mark.parametrize("overrides", [[], ["--train.async_save=true"], ["--parallel.ds_config=zero0"],
                                       ["--parallel.ds_config=zero2_offload"], ["--parallel.ds_config=zero3_offload"],
                                       ["--parallel.ds_config=bf16"]], ids=["zero1", "zero1_async", "zero0",
                                                                          "zero2_offload", "zero3_offload", "bf16"])
def test_resume_is_bit_identical(tmp_path, overrides):
    """Weights, fp32 master, Adam moments and RNG come back exactly, whatever the ZeRO stage and precision.
    The uninterrupted run is also the check that each DeepSpeed config loads, steps and saves."""
    base = TINY + ["--train.steps=6", "--train.save_every=3"] + overrides
    train(base + [f"--train.out_dir={tmp_path / 'a'}"])
    rows = read_metrics(tmp_path / "a")
    assert rows[-1]["step"] == 6 and rows[-1]["loss"] == rows[-1]["loss"]  # finite, not NaN
    assert list((tmp_path / "a" / "checkpoints" / "step_6" / "model").glob("*.safetensors"))
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "step_3", tmp_path / "b" / "checkpoints" / "step_3")
    (tmp_path / "b" / "checkpoints" / "latest").write_text("step_3\n")
    train(base + [f"--train.out_dir={tmp_path / 'b'}", "--train.resume=latest"])
    full = {r["step"]: r for r in read_metrics(tmp_path / "a")}
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "b")}
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step]["loss"] == full[step]["loss"]
        assert resumed[step]["grad_norm"] == full[step]["grad_norm"]


def _losses(run_dir):
    return [(r["loss"], r["grad_norm"]) for r in read_metrics(run_dir) if "loss" in r]


def test_data_parallel_and_accumulation_match_one_process(tmp_path):
    args = TINY + ["--train.steps=4"]
    train(args + [f"--train.out_dir={tmp_path / 'one'}"])
    train(args + [f"--train.out_dir={tmp_path / 'dp2'}"], launcher=torchrun(2))
    train(args + [f"--train.out_dir={tmp_path / 'accum'}", "--train.micro_batch_size=2"])
    train(args + [f"--train.out_dir={tmp_path / 'ds'}", "--train.micro_batch_size=2"], launcher=deepspeed_launcher(2))
    one = _losses(tmp_path / "one")
    for other in ("dp2", "accum", "ds"):
        for (l1, g1), (l2, g2) in zip(one, _losses(tmp_path / other), strict=True):
            assert l2 == pytest.approx(l1, rel=1e-5), other
            assert g2 == pytest.approx(g1, rel=1e-4), other


def test_fp16_config(tmp_path):
    proc = train(TINY + ["--train.steps=2", "--parallel.ds_config=fp16", f"--train.out_dir={tmp_path}"],
                 check=torch.cuda.is_available())
    if not torch.cuda.is_available():  # DeepSpeed's CPU accelerator rejects fp16: we must say so up front
        assert proc.returncode == 2 and "needs a CUDA GPU" in proc.stderr and "bf16" in proc.stderr


@pytest.mark.parametrize("override, message", [
    (["--data.dataset=/nonexistent/corpus"], "/nonexistent/corpus.bin' does not exist"),
    (["--train.resume=/nonexistent/ckpt"], "'/nonexistent/ckpt' does not exist"),
    (["--train.bogus=1"], "unknown config key 'train.bogus'"),
    (["--train.steps=100000000"], "add data, lower train.steps"),
])
def test_bad_input_stops_with_a_clear_message(tmp_path, override, message):
    proc = train(TINY + [f"--train.out_dir={tmp_path / 'run'}"] + override, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_existing_run_is_never_overwritten(trained):
    before = (trained / "metrics.jsonl").read_bytes()
    proc = train(TINY + ["--train.steps=2", f"--train.out_dir={trained}"], check=False)
    assert proc.returncode == 2 and "--train.resume=latest" in proc.stderr
    assert (trained / "metrics.jsonl").read_bytes() == before


def test_generate_reports_a_missing_checkpoint(tmp_path):
    proc = run_cmd([PYTHON, "-m", "sparselm.generate", "--ckpt", str(tmp_path / "nothing")], check=False)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_corrupt_checkpoint_is_named(trained, tmp_path):
    from sparselm.checkpoint.checkpointing import CheckpointError, load_model, read_meta
    from sparselm.checkpoint.integrity import seal

    ckpt = tmp_path / "step_30"
    shutil.copytree(trained / "checkpoints" / "step_30", ckpt)
    shard = next((ckpt / "model").glob("*.safetensors"))
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=f"{shard.name}' has {len(data) // 2} bytes, {len(data)} when written"):
        load_model(ckpt)
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}' is missing"):
        load_model(ckpt)
    shard.write_bytes(b"\xff" * len(data))  # the right size, but no safetensors header
    with pytest.raises(CheckpointError, match=f"{shard.name}' fails its checksum: xxh3_64 "):
        load_model(ckpt)
    shard.write_bytes(data)
    meta = read_meta(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))  # edited by hand: its own checksum is gone
    with pytest.raises(CheckpointError, match="meta.json' has lost the checksum of its own text"):
        load_model(ckpt)
    meta["tensors"]["embed.weight"][0] += 1
    (ckpt / "meta.json").write_text(seal(meta))  # resealed: the files still disagree with it
    with pytest.raises(CheckpointError, match="do not match its meta.json.*embed.weight"):
        load_model(ckpt)
    (ckpt / "meta.json").write_text(seal({**meta, "format": "other"}))
    with pytest.raises(CheckpointError, match="not a sparselm checkpoint"):
        load_model(ckpt)
