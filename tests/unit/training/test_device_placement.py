"""Everything on the engine's device (issue 27): buffers moved there after ``deepspeed.initialize`` (under
ZeRO-3 the engine leaves the module where it was built) and no tensor made in a forward, backward or step
hook on the default device instead of the input's.

CPU: a training forward, backward and the step-end hooks of every block kind and variant run with the
default device set to ``meta``: a tensor created without naming the input's device lands on ``meta`` and
the first op mixing it with the CPU model fails.  GPU (skipped without CUDA): after construction under
ZeRO 0-3 and offload, every buffer is on the engine's device and every parameter is when its module runs.
"""
from __future__ import annotations

import pytest
import torch

from sparselm.config import load_config
from sparselm.model import build_model

SMALL = ["--model.vocab_size=64", "--model.d_model=32", "--model.n_heads=2", "--model.max_seq_len=32",
         "--data.seq_len=32"]
PKM = ["--pkm.n_keys=64", "--pkm.knn=4", "--pkm.k_dim=16"]
MOE = ["--moe.num_experts=4", "--moe.expert_hidden=32"]
CASES = {
    "tiny_mixed": ("tiny_mixed", PKM + ["--pkm.gated=true"]),
    "moe_noisy_shared_sigmoid": ("tiny_moe", MOE + ["--model.n_layers=1", "--moe.noisy_gating=true",
                                                    "--moe.num_shared_experts=1", "--moe.score_func=sigmoid"]),
    "moe_capacity_bias_padded": ("tiny_moe", MOE + ["--model.n_layers=1", "--moe.top_k=1", "--moe.drop_tokens=true",
                                                    "--moe.bias_balancing=true", "--moe.expert_impl=padded"]),
    "pkm_ffn_shared": ("tiny_pkm", PKM + ["--model.n_layers=2", "--model.pattern=[pkm_ffn,pkm_ffn]",
                                          "--pkm.share_values=0,1", "--pkm.v_dim=16"]),
    "allattn_bigbird": ("tiny_allattn", ["--model.n_layers=1", "--attention.pattern=bigbird", "--attention.block=8"]),
    "allattn_strided": ("tiny_allattn", ["--model.n_layers=1", "--attention.pattern=strided", "--attention.stride=8", "--attention.window=8"]),
}


@pytest.mark.parametrize("case", CASES)
def test_no_tensor_is_made_on_the_default_device(case):
    preset, extra = CASES[case]
    cfg = load_config(preset, SMALL + extra)
    model = build_model(cfg).train()
    x = torch.randint(0, 64, (2, 32))
    with torch.device("meta"):
        logits = model(x)
        logits.float().square().mean().backward()
        for module in model.modules():
            if hasattr(module, "after_optimizer_step"):
                module.after_optimizer_step()
    assert logits.device.type == "cpu"
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert t.device.type == "cpu", name
        assert t.grad is None or t.grad.device.type == "cpu", name


def test_place_buffers_moves_every_buffer():
    from sparselm.training.engine import place_buffers

    model = build_model(load_config("tiny_mixed", SMALL + PKM))
    names = {n for n, _ in model.named_buffers()}
    assert any("inv_freq" in n for n in names) and any("usage" in n for n in names) and any("load" in n for n in names)
    moved = place_buffers(model, "meta")
    assert set(moved) == names
    assert all(b.device.type == "meta" for b in model.buffers())
    assert all(p.device.type == "cpu" for p in model.parameters())  # parameters are the engine's business
    assert place_buffers(model, torch.device("meta")) == []


needs_cuda = pytest.mark.gpu(reason="needs a CUDA GPU (the engine's device)")
GPU_RUN = ["--model.d_model=64", "--model.n_heads=4", "--data.seq_len=32", "--model.max_seq_len=32",
           "--train.global_batch_size=2", "--train.steps=1", "--train.progress=false", "--train.tensorboard=false",
           "--train.eval_every=0", "--train.save_every=0", "--model.vocab_size=0"] + PKM
STAGES = {"zero0": ["--parallel.ds_config=zero0"], "zero1": ["--parallel.ds_config=zero1"],
          "zero2": ["--parallel.ds_config=zero1", "--parallel.zero_stage=2"],
          "zero2_offload": ["--parallel.ds_config=zero2_offload"], "zero3": ["--parallel.ds_config=zero3"],
          "zero3_offload": ["--parallel.ds_config=zero3_offload"], "bf16_zero3": ["--parallel.ds_config=bf16",
                                                                                 "--parallel.zero_stage=3"]}


@needs_cuda
@pytest.mark.parametrize("stage", STAGES)
def test_every_tensor_is_on_the_engine_device_under_every_zero_stage(tmp_path, stage):
    from sparselm.training.trainer import Trainer

    cfg = load_config("tiny_mixed", GPU_RUN + STAGES[stage] + [f"--train.out_dir={tmp_path}"])
    trainer = Trainer(cfg)
    try:
        device = torch.device(trainer.engine.device)
        assert device.type == "cuda"
        off = [n for n, b in trainer.engine.module.named_buffers() if b.device != device]
        assert not off, f"buffers not on {device}: {off}"
        seen = []

        def check(module, _inputs):  # runs after DeepSpeed's own pre-forward hooks (ZeRO-3 gathers there)
            for name, t in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
                if t.device != device:
                    seen.append(f"{type(module).__name__}.{name} on {t.device}")

        hooks = [m.register_forward_pre_hook(check) for m in trainer.engine.module.modules()]
        trainer.run()
        for h in hooks:
            h.remove()
        assert not seen, seen
    finally:
        trainer.close()
