"""``train.compile`` (sparselm/training/compile.py): blocks compiled in place equal eager over 3 SGD steps (losses
and weights, 1e-5) for dense (the real default backend, inductor, once: it compiles C++ on CPU for ~30 s),
MoE, PKM and all-attention blocks (``aot_eager``: dynamo's graph capture and AOT autograd, with the graph
breaks MoE needs, without inductor's code generation); a MoE model does not recompile once its routing
sizes have been seen as dynamic; the trainer compiles before the engine and trains the same numbers; a
torch without a working backend and a GPU without bf16 are refused at start-up in one line."""
from __future__ import annotations

import pytest
import torch

from sparselm.config import ConfigError, load_config
from sparselm.model import build_model
from sparselm.training.metrics import read_metrics

SMALL = ["--model.vocab_size=64", "--pkm.n_keys=64", "--pkm.knn=4", "--pkm.k_dim=16"]
CASES = {"dense": ("tiny_dense", "inductor"), "moe": ("tiny_moe", "aot_eager"), "pkm": ("tiny_pkm", "aot_eager"),
         "allattn": ("tiny_allattn", "aot_eager")}


def _train(model, x, steps):
    # SGD: a weight's change is proportional to its gradient (Adam's normalised step would turn last-bit
    # differences of a near-zero gradient into steps of up to lr)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x, labels=x)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    return losses


@pytest.mark.parametrize("case", CASES)
def test_compiled_blocks_equal_eager(case):
    from sparselm.training.compile import compile_blocks

    preset, backend = CASES[case]
    torch._dynamo.reset()
    cfg = load_config(preset, SMALL + ["--model.n_layers=2", "--data.seq_len=32", "--model.max_seq_len=32"])
    eager, compiled = build_model(cfg).train(), build_model(cfg).train()
    assert compile_blocks(compiled, backend=backend) == 2
    names = [n for n, _ in compiled.named_parameters()]
    assert names == [n for n, _ in eager.named_parameters()]  # in place: checkpoints keep their names
    x = torch.randint(0, 64, (2, 32))
    ref, got = _train(eager, x, 3), _train(compiled, x, 3)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    ref_params = dict(eager.named_parameters())
    for name, p in compiled.named_parameters():
        torch.testing.assert_close(p, ref_params[name], rtol=1e-5, atol=1e-6)
    if case == "moe":  # routing sizes change every step: after they turn dynamic, no more compiles
        from torch._dynamo.utils import counters

        before = counters["stats"]["unique_graphs"]
        _train(compiled, torch.randint(0, 64, (2, 32)), 2)
        assert counters["stats"]["unique_graphs"] == before


def test_trainer_compiles_blocks_and_trains_the_eager_numbers(tmp_path, monkeypatch):
    import sparselm.training.compile
    from sparselm.train import main

    monkeypatch.setattr(sparselm.training.compile, "BACKEND", "aot_eager")
    base = ["--config", "tiny_mixed", *SMALL[1:], "--train.steps=3", "--train.log_every=1", "--train.eval_every=0",
            "--train.save_every=0", "--train.progress=false", "--train.tensorboard=false"]
    runs = {}
    for mode in ("false", "true"):
        torch._dynamo.reset()
        main(base + [f"--train.compile={mode}", f"--train.out_dir={tmp_path / mode}"])
        runs[mode] = read_metrics(tmp_path / mode, train_only=True)
    assert len(runs["true"]) == 3
    for a, b in zip(runs["true"], runs["false"]):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), key


def test_compile_without_a_working_backend_is_refused_at_startup(monkeypatch):
    import sparselm.training.compile
    from sparselm.training.preflight import preflight

    cfg = load_config("tiny_dense", ["--train.compile=true"], check=False)
    monkeypatch.setattr(sparselm.training.compile, "BACKEND", "no_such_backend")  # as a torch without inductor would be
    with pytest.raises(ConfigError) as err:
        preflight(cfg, world_size=1)
    assert "set train.compile=false" in str(err.value) and "\n" not in str(err.value)


def test_compile_under_zero3_is_refused_at_startup():
    from sparselm.training.preflight import preflight

    cfg = load_config("tiny_dense", ["--train.compile=true", "--parallel.ds_config=zero3_offload"], check=False)
    with pytest.raises(ConfigError, match="ZeRO stage 3.*set train.compile=false"):
        preflight(cfg, world_size=1)


def test_bf16_on_a_gpu_without_bf16_is_refused_naming_fp16(monkeypatch):
    from sparselm.training.engine import build_ds_config

    cfg = load_config("tiny_dense", ["--parallel.ds_config=bf16"])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-32GB")
    with pytest.raises(ConfigError, match="parallel.ds_config=fp16"):
        build_ds_config(cfg, 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert build_ds_config(cfg, 1)["bf16"]["enabled"]
