"""A tiny gpt-oss-shaped model (every piece: learned attention sinks with grouped-query heads, alternating
sliding and full layers, q/k/v and output-projection biases, a biased router, biased experts, the clamped
SwiGLU) trains under tp2 (experts cut by width), ep2, pp2, ZeRO-3 with ep2 (experts in gather
chunks) and ZeRO-3 offload with tp2 with the same losses and gradient norms as one process (fp32, 3 steps,
clipping active).

One spawn of a one-process world trains the reference; one spawn of a 4-rank gloo world trains the layouts."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.distributed import run_distributed

BASE = ["--model.d_model=32", "--model.n_heads=4", "--model.n_kv_heads=2", "--model.n_layers=2",
        "--model.pattern=[moe]", "--model.attention_layers=[sliding,full]", "--model.sliding_window=5",
        "--model.attention_sinks=true", "--model.qkv_bias=true", "--model.o_bias=true",
        "--moe.num_experts=4", "--moe.top_k=2", "--moe.expert_hidden=16", "--moe.num_shared_experts=0",
        "--moe.router_bias=true", "--moe.expert_biases=true", "--moe.swiglu_limit=0.05",
        "--moe.swiglu_alpha=1.702", "--moe.swiglu_up_offset=1.0",
        "--data.seq_len=16", "--model.max_seq_len=16", "--train.global_batch_size=4", "--train.steps=3",
        "--train.progress=false", "--train.tensorboard=false", "--train.eval_every=0", "--train.log_every=1",
        "--train.save_every=0", "--optim.grad_clip=0.05", "--optim.warmup_steps=0", "--optim.lr=0.05"]
LAYOUTS = {
    "tp2": ["--parallel.tp=2"],
    "ep2": ["--parallel.ep=2"],
    "pp2": ["--parallel.pp=2", "--train.micro_batch_size=1"],
    "ep2_zero3": ["--parallel.ep=2", "--parallel.ds_config=zero3"],
    "tp2_zero3_offload": ["--parallel.tp=2", "--parallel.ds_config=zero3_offload"],
}
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


def _train(rank, world, jobs, out):
    from sparselm.config import load_config
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    from sparselm.training.trainer import Trainer

    for name in jobs:
        cfg = load_config("tiny_moe", BASE + LAYOUTS.get(name, []) + [f"--train.out_dir={Path(out) / name}"])
        trainer = Trainer(cfg)
        try:
            trainer.run()
        finally:
            trainer.close()
    if rank:
        return None
    return {name: [json.loads(line) for line in (Path(out) / name / "metrics.jsonl").read_text().splitlines()
                   if '"loss"' in line] for name in jobs}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    ref = run_distributed(_train, 1, ["one"], str(tmp_path_factory.mktemp("gpt-oss-ref")))[0]
    runs = run_distributed(_train, 4, list(LAYOUTS), str(tmp_path_factory.mktemp("gpt-oss")))[0]
    return {**ref, **runs}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gpt_oss_pieces_train_as_one_process(rows, layout):
    ref, got = rows["one"], rows[layout]
    assert [r["step"] for r in got] == [1, 2, 3]
    for want, row in zip(ref, got):
        for key in KEYS:
            assert row[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (layout, row["step"], key)
