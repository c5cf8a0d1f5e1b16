"""The all-attention presets: tiny_allattn trains as a real process and reloads; the GPU preset validates."""
import torch

from support.run import train
from sparselm.training.metrics import read_metrics
from sparselm.config import load_config

SMALL = ["--config", "tiny_allattn", "--model.d_model=64", "--model.n_layers=2", "--model.n_heads=2",
         "--data.seq_len=32", "--model.max_seq_len=32", "--attention.window=16", "--train.global_batch_size=8",
         "--train.steps=25", "--optim.warmup_steps=5", "--train.progress=false", "--train.tensorboard=false",
         "--train.eval_every=0", "--train.log_every=1"]


def test_tiny_allattn_trains_and_reloads(tmp_path):
    import sparselm

    train(SMALL + [f"--train.out_dir={tmp_path}"])
    losses = [r["loss"] for r in read_metrics(tmp_path) if "loss" in r]
    assert len(losses) == 25 and all(map(torch.isfinite, torch.tensor(losses)))
    assert sum(losses[-5:]) / 5 < losses[0] - 0.5
    model, cfg = sparselm.load_model(tmp_path)
    attn = model.layers[0].attn
    assert model.layers[0].ffn is None and attn.spec.name == "sliding_window" and attn.memory_slots > 0
    logits = model(torch.randint(0, cfg.model.vocab_size, (1, 32)))
    assert logits.isfinite().all()


def test_long_context_gpu_preset_is_valid():
    cfg = load_config("allattn_16k")
    assert cfg.data.seq_len == 16384 and cfg.attention.pattern == "bigbird" and cfg.model.pattern == ["allattn"]
