"""Tiny Hugging Face models for the conversion tests (built locally with transformers, nothing downloaded):
weights moved far from their init, saved as transformers publishes them or with its in-memory (fused) names,
compared by their logits, and an imported checkpoint trained under a layout for the round-trip tests."""
from __future__ import annotations

import torch
from safetensors.torch import save_file


@torch.no_grad()
def move_from_init(model):
    """Give every weight of MODEL a value far from its init (norm weights, biases, sinks, router weights and the
    selection bias included), so that every tensor's mapping matters.  Returns MODEL."""
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            p.copy_(1 + 0.2 * torch.randn_like(p))
        elif name.endswith(("bias", "sinks")) or "router" in name or name.endswith("gate.weight"):
            p.normal_(0, 0.3)
        elif p.dim() >= 2:
            p.normal_(0, 0.08)
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.normal_(0, 0.05)
    return model


def save_hf(model, path, fused: bool = False):
    """save_pretrained in small shards (per-expert names, as published), or one file of the transformers-5
    in-memory (fused) names.  Returns PATH."""
    model.save_pretrained(str(path), max_shard_size="200KB")
    if fused:
        for f in list(path.glob("*.safetensors")) + list(path.glob("*.index.json")):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def max_diff(hf, ours, ids) -> float:
    """Largest |logit difference| of the two models on token ids IDS."""
    with torch.no_grad():
        return (hf(ids).logits - ours(ids)).abs().max().item()


def train_imported(rank, world, ckpt, out):
    """Two optimizer steps of the imported checkpoint CKPT under tp=2 x ep=2 (4 ranks: ep inside dp 2), through
    sparselm.train.main, into run directory OUT (for ``support.distributed.run_distributed``).  Returns RANK."""
    from sparselm.train import main

    main(["--config", str(ckpt / "config.yaml"), "--parallel.tp=2", "--parallel.ep=2", f"--train.resume={ckpt}",
          "--train.steps=2", "--train.global_batch_size=4", "--data.seq_len=32", "--optim.lr=1e-2",
          "--optim.warmup_steps=0", f"--train.out_dir={out}", "--train.eval_every=0", "--train.progress=false",
          "--train.tensorboard=false", "--data.tokenizer=byte"])
    return rank


def export_and_load(ckpt, out, fused: bool = False, *extra: str):
    """``export-hf`` of sparselm checkpoint CKPT into OUT (transformers 5's fused expert names with FUSED; EXTRA
    more arguments), then the written model loaded by transformers, which must find every tensor it expects and
    no other.  Returns (the model in eval mode, the written config.json as a dict)."""
    import json

    import transformers

    from tools.convert_checkpoint import main as convert

    convert(["export-hf", "--input", str(ckpt), "--output", str(out), *(["--fused-experts"] if fused else []), *extra])
    model, info = transformers.AutoModelForCausalLM.from_pretrained(str(out), local_files_only=True,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval(), json.loads((out / "config.json").read_text())


def assert_same_predictions(hf, ours, ids, eod_id: int, what: str) -> float:
    """transformers' model HF and sparselm's OURS give logits within 1e-5 on IDS (the largest difference is
    printed, labelled WHAT) and the same 20 greedy tokens after the first sequence's first 5.  Returns that
    difference."""
    from sparselm.generate import generate

    diff = max_diff(hf, ours, ids)
    print(f"{what}: max|diff| {diff:.2e}")
    assert diff < 1e-5, diff
    prompt = ids[:1, :5]
    mine = generate(ours, prompt, 20, temperature=0, eod_id=eod_id)[0].tolist()
    assert hf.generate(prompt, max_new_tokens=20, do_sample=False)[0].tolist() == mine
    return diff
