"""A changed byte in any file of a checkpoint is named on resume, load_model, evaluate and verify; a resume with
train.resume_fallback continues from the newest checkpoint that verifies with an uninterrupted run's losses.

One short run (a BPE tokenizer, so the checkpoint carries tokenizer.json) is trained once; every test damages a copy.
"""
import json
import shutil
import sys

import pytest

from sparselm.errors import CheckpointError
from sparselm.training.metrics import read_metrics
from support.bpe import bpe_dataset
from support.run import PYTHON, TINY, run_cmd, torchrun
from tools.convert_checkpoint import main as convert

SHARD = "shard-00001-model-00001-of-00001.safetensors"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(root, train args): checkpoints at steps 2 and 4 of a 4-step run on a BPE tokenizer."""
    root = tmp_path_factory.mktemp("integrity")
    prefix = bpe_dataset(root)
    args = [*TINY, "--train.steps=4", "--train.save_every=2", "--train.global_batch_size=2",
            f"--data.tokenizer={root / 'tok' / 'tokenizer.json'}", f"--data.dataset={prefix}",
            f"--data.valid_dataset={prefix}", "--data.seq_len=16", "--model.max_seq_len=16"]
    run_cmd([PYTHON, "-m", "sparselm.train", *args, f"--train.out_dir={root / 'run'}"])
    return root, args


def damaged_copy(run, dest, rel: str, how):
    """A copy of the run whose step_4 file ``rel`` is changed by ``how(bytes) -> bytes``; returns (run dir, path)."""
    root, _ = run
    out = dest / "run"
    shutil.copytree(root / "run", out)
    path = out / "checkpoints" / "step_4" / rel
    path.write_bytes(how(path.read_bytes()))
    return out, path


def flip_middle(data: bytes) -> bytes:
    at = len(data) // 2
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1:]


def flip_in_header(data: bytes) -> bytes:
    """A digit of DCP's saved offsets in the safetensors header (still valid JSON: a wrong offset)."""
    at = data.index(b"saved_offsets") + len(b'saved_offsets\\": [')
    while not data[at:at + 1].isdigit():
        at += 1
    return data[:at] + (b"1" if data[at:at + 1] == b"0" else b"0") + data[at + 1:]


KINDS = {
    "model shard": (f"model/{SHARD}", flip_middle),
    "optimizer shard": (f"optimizer/{SHARD}", flip_middle),
    "DCP metadata": (f"model/{SHARD}", flip_in_header),
    "RNG file": ("rng_rank0.safetensors", flip_middle),
    "config": ("config.yaml", lambda d: d.replace(b"steps: 4", b"steps: 5")),
    "tokenizer": ("tokenizer.json", flip_middle),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_changed_byte_is_named_everywhere_it_is_read(run, tmp_path, kind, capsys, monkeypatch):
    import sparselm
    from sparselm.checkpoint.checkpointing import open_model_tensors, read_meta
    from sparselm.evaluate import main as evaluate
    from sparselm.train import main as train

    rel, how = KINDS[kind]
    out, path = damaged_copy(run, tmp_path, rel, how)
    named = f"{path.name}' fails its checksum"
    good = out / "checkpoints" / "step_2"

    with pytest.raises(CheckpointError, match=named) as err:
        sparselm.load_model(out)
    assert f"the newest earlier checkpoint that verifies is {good}" in str(err.value)
    if kind == "DCP metadata":  # a reader opened directly checks every header before trusting DCP's offsets
        ckpt = out / "checkpoints" / "step_4"
        with pytest.raises(CheckpointError, match=f"{path.name}' fails its checksum \\(in its header\\)"):
            open_model_tensors(ckpt, read_meta(ckpt))

    with pytest.raises(SystemExit) as exit_:
        evaluate(["--ckpt", str(out), "--batches", "1", "--batch-size", "2"])
    assert exit_.value.code == 2 and named in capsys.readouterr().err

    monkeypatch.setattr(sys, "argv", ["convert_checkpoint.py", "verify", "--input", str(out), "--workers", "1"])
    with pytest.raises(SystemExit) as exit_:
        convert()
    lines = capsys.readouterr().out.splitlines()
    assert exit_.value.code == 1
    assert lines[0].startswith("step_2: ok") and lines[1].startswith("step_4: damaged: ") and named in lines[1]

    _, args = run
    with pytest.raises(CheckpointError, match=named) as err:
        train([*args, f"--train.out_dir={out}", "--train.resume=latest"])
    assert "--train.resume_fallback=true" in str(err.value) or kind == "config"  # config: named before the trainer


def test_resume_falls_back_to_the_newest_checkpoint_that_verifies(run, tmp_path, capsys):
    """With train.resume_fallback, a damaged step_4 is passed over for step_2, said so, and steps 3-4 give the
    losses of the run that never stopped; nothing is deleted before the run saves step_4 anew."""
    from sparselm.train import main as train

    root, args = run
    out, path = damaged_copy(run, tmp_path, f"optimizer/{SHARD}", flip_middle)
    before = [r for r in read_metrics(root / "run") if "loss" in r]
    train([*args, f"--train.out_dir={out}", "--train.resume=latest", "--train.resume_fallback=true"])
    said = capsys.readouterr().out
    assert f"checkpoint {out / 'checkpoints' / 'step_4'} is damaged" in said and path.name in said
    assert f"resuming from {out / 'checkpoints' / 'step_2'}, the newest checkpoint that verifies" in said
    assert f"resumed from {out / 'checkpoints' / 'step_2'} at step 2" in said
    after = [r for r in read_metrics(out) if "loss" in r]  # the resumed run rewrote the lines after step 2
    assert [r["step"] for r in after] == [1, 2, 3, 4]
    assert [(r["loss"], r["grad_norm"]) for r in after] == [(r["loss"], r["grad_norm"]) for r in before]
    assert convert(["verify", "--input", str(out), "--workers", "1"]) == {
        str(out / "checkpoints" / "step_2"): "ok", str(out / "checkpoints" / "step_4"): "ok"}


def test_truncated_missing_and_unfinished_are_named_by_verify(run, tmp_path, capsys):
    out, path = damaged_copy(run, tmp_path, f"model/{SHARD}", lambda d: d[:100])
    (out / "checkpoints" / "step_2" / "rng_rank0.safetensors").unlink()
    (out / "checkpoints" / ".tmp_step_6").mkdir()
    status = convert(["verify", "--input", str(out)])
    text = capsys.readouterr().out
    assert list(status.values()) == ["damaged", "damaged", "incomplete"]
    assert "step_2: damaged: checkpoint file 'rng_rank0.safetensors' is missing" in text
    assert f"step_4: damaged: checkpoint file 'model/{SHARD}' has 100 bytes" in text
    assert ".tmp_step_6: incomplete" in text


def test_checkpoints_written_before_checksums_load_with_a_notice(run, tmp_path, capsys):
    import sparselm
    from sparselm.checkpoint.checkpointing import read_meta

    root, _ = run
    ckpt = tmp_path / "step_4"
    shutil.copytree(root / "run" / "checkpoints" / "step_4", ckpt)
    meta = read_meta(ckpt)
    del meta["checksums"]
    (ckpt / "meta.json").write_text(json.dumps(meta, indent=1))
    sparselm.load_model(ckpt)
    notes = [line for line in capsys.readouterr().out.splitlines() if "without checksums" in line]
    assert notes == [f"sparselm: note: '{ckpt}' was written without checksums (before sparselm recorded them), so its "
                     "files cannot be verified"]
    assert convert(["verify", "--input", str(ckpt)]) == {str(ckpt): "ok, not verifiable"}


def test_two_ranks_verify_their_share_and_stop_together(run, tmp_path):
    """Each of two ranks hashes its share of the files (the model shard falls to rank 0, tokenizer.json to rank 1):
    both problems are gathered, and both ranks stop at once with the same line, exit status 2."""
    out, shard = damaged_copy(run, tmp_path, f"model/{SHARD}", flip_middle)
    tok = out / "checkpoints" / "step_4" / "tokenizer.json"
    tok.write_bytes(flip_middle(tok.read_bytes()))
    _, args = run
    proc = run_cmd(torchrun(2) + [*args, f"--train.out_dir={out}", "--train.resume=latest"], check=False, timeout=300)
    assert proc.returncode != 0
    assert f"{shard.name}' fails its checksum" in proc.stderr and "(and 1 more problem(s))" in proc.stderr
