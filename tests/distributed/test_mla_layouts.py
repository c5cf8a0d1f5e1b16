"""Multi-head latent attention and multi-token prediction under every layout: the same losses, auxiliary losses,
gradient norms, each prediction depth's loss and every layer statistic as one process (fp32, 4 steps, clipping
active); so do ZeRO-3 with CPU offload, activation recomputation (full, selective; the MTP depths' blocks
recomputed too) and train.compile.

The model (one case: MLA alone is also checked against one process, gradient by gradient, in
test_tensor_parallel.py): two MLA blocks (a query latent, interleaved rope, yarn's softmax-scale fold, v_head_dim != qk
width, DeepSeek's projection biases, a strided sparse pattern over its scores), a dense one and an MoE one with a
shared expert, and two multi-token-prediction depths (MoE blocks;
under pp2 on the last stage, with its copy of the embedding).  One spawn of a one-process world trains the
reference under ZeRO-1; one spawn of a 4-rank gloo world trains, with the real Trainer, tp2 x dp2 (heads split,
latent down-projections whole on each rank), pp2 x dp2, ep2 x dp4, ZeRO-3 over dp4 (also with parameters and
optimizer offloaded to the CPU), tp2 x dp2 recomputing every block whole (parallel.recompute=full), pp2 x dp2
recomputing all but the weight matmuls (selective) and pp2 x dp2 with train.compile (every block compiled, the
MTP depths' on the last stage too; backend aot_eager: dynamo's capture and AOT autograd without inductor's C++
build).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.distributed import run_distributed

WORLD = 4
BASE = ["--model.d_model=32", "--model.n_heads=2", "--model.n_layers=2", "--model.pattern=[dense,moe]",
        "--moe.num_experts=4", "--moe.expert_hidden=16", "--moe.num_shared_experts=1", "--model.attention=mla",
        "--model.q_lora_rank=12", "--model.kv_lora_rank=8", "--model.qk_nope_head_dim=8",
        "--model.qk_rope_head_dim=4", "--model.v_head_dim=12", "--model.rope_interleave=true",
        "--model.rope.scaling=yarn", "--model.rope.factor=4", "--model.rope.original_max_seq_len=8",
        "--model.rope.mscale_all_dim=1.0", "--data.seq_len=16", "--model.max_seq_len=16",
        "--train.global_batch_size=4", "--train.steps=4", "--train.progress=false", "--train.tensorboard=false",
        "--train.eval_every=0", "--train.log_every=1", "--train.save_every=0", "--model.vocab_size=0",
        "--optim.grad_clip=0.05", "--model.qkv_bias=true", "--model.o_bias=true", "--attention.pattern=strided",
        "--attention.stride=4"]
CASES = {"mla_mtp": ["--model.mtp_layers=2", "--model.mtp_loss_weight=0.5"]}
KEYS = {"mla_mtp": ("loss", "lm_loss", "aux_loss", "grad_norm", "mtp_loss", "mtp1_loss", "mtp2_loss")}
SETTINGS = {
    "one": ["--parallel.ds_config=zero1"],
    "tp2": ["--parallel.ds_config=zero1", "--parallel.tp=2"],
    "pp2": ["--parallel.ds_config=zero1", "--parallel.pp=2", "--train.micro_batch_size=1"],
    "ep2": ["--parallel.ds_config=zero1", "--parallel.ep=2"],
    "zero3": ["--parallel.ds_config=zero3"],
    "zero3_offload": ["--parallel.ds_config=zero3_offload"],
    "tp2_full": ["--parallel.ds_config=zero1", "--parallel.tp=2", "--parallel.recompute=full"],
    "pp2_selective": ["--parallel.ds_config=zero1", "--parallel.pp=2", "--train.micro_batch_size=1",
                      "--parallel.recompute=selective"],
    "pp2_compile": ["--parallel.ds_config=zero1", "--parallel.pp=2", "--train.micro_batch_size=1",
                    "--train.compile=true"],  # (refused with ZeRO-3 and with recomputation)
}
LAYOUTS = ["tp2", "pp2", "ep2", "zero3", "zero3_offload", "tp2_full", "pp2_selective", "pp2_compile"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _rel(got, want) -> float:
    """Largest relative difference of two numbers or lists of numbers (a per-expert statistic)."""
    pairs = zip(got, want) if isinstance(want, list) else [(got, want)]
    return max(abs(g - w) / max(abs(w), 1e-12) for g, w in pairs)


def train_jobs(rank, world, jobs, out):
    """Train each (case, setting) in this world with the real Trainer; rank 0 returns every run's metrics, every
    rank under train.compile how many of its modules were compiled (key (case, setting, 'compiled'))."""
    import sparselm.training.compile
    from sparselm.config import load_config
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    from sparselm.training.trainer import Trainer

    sparselm.training.compile.BACKEND = "aot_eager"
    compiled = {}
    for case, setting in jobs:
        cfg = load_config("tiny_moe", BASE + CASES[case] + SETTINGS[setting]
                          + [f"--train.out_dir={Path(out) / f'{case}-{setting}'}"])
        trainer = Trainer(cfg)
        try:
            trainer.run()
            if cfg.train.compile:
                compiled[(case, setting, "compiled")] = sum(getattr(m, "_compiled_call_impl", None) is not None
                                                            for m in trainer.module.modules())
        finally:
            trainer.close()
    rows = {job: _rows(Path(out) / f"{job[0]}-{job[1]}") for job in jobs} if rank == 0 else {}
    return {**rows, **compiled}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Metrics of every (case, setting): the one-process references and the 4-rank layouts."""
    out = tmp_path_factory.mktemp("mla")
    rows = run_distributed(train_jobs, 1, [(case, "one") for case in CASES], str(out / "one"))[0]
    jobs = [(case, layout) for case in CASES for layout in LAYOUTS]
    ranks = run_distributed(train_jobs, WORLD, jobs, str(out / "four"))
    rows.update(ranks[0])
    rows.update({(*job, "compiled"): [r[(*job, "compiled")] for r in ranks] for job in jobs if "compile" in job[1]})
    return rows


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES))
def test_layout_trains_as_one_process(runs, case, layout):
    ref, rows = runs[(case, "one")], runs[(case, layout)]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # and every layer statistic, the MTP depths' blocks' (layers 2 and 3) included: a recomputed or compiled
    # forward counts expert loads once
    layer_keys = sorted(k for k in ref[0] if k.startswith("layer"))
    assert {k.split("/")[0] for k in layer_keys} == {"layer1", "layer2", "layer3"}
    for got, want in zip(rows, ref):
        assert sorted(k for k in got if k.startswith("layer")) == layer_keys
        for key in (*KEYS[case], *layer_keys):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), (case, layout, got["step"], key)
    worst = {key: max(_rel(g[key], w[key]) for g, w in zip(rows, ref)) for key in (*KEYS[case], *layer_keys)}
    layers = max(worst.pop(key) for key in layer_keys)
    print(f"{case} {layout}: max rel |diff| over 4 steps: " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items())
          + f", layer statistics {layers:.1e}")


@pytest.mark.parametrize("case", list(CASES))
def test_compile_compiles_every_block_and_each_prediction_depth(runs, case):
    """pp2 x dp2: the two stages of each data-parallel replica together compile two layers and two MTP blocks."""
    per_rank = runs[(case, "pp2_compile", "compiled")]
    assert len(per_rank) == WORLD and sum(per_rank) == (WORLD // 2) * (2 + 2), per_rank
