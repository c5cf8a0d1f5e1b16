"""Pipeline parallelism: stage partitioning and tied embeddings across the first and last stage."""
import pytest
import torch

from support.run import TINY, torchrun, train
from sparselm.training.metrics import read_metrics
from support.distributed import run_distributed


def _stage_layers(rank, world, method):
    import deepspeed.comm
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    from sparselm.config import load_config
    from sparselm.model import build_model
    from sparselm.parallel.pipeline import build_pipeline

    deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    cfg = load_config("tiny_dense", ["--model.vocab_size=64", "--model.n_layers=6", "--model.d_model=32",
                                     "--model.n_heads=2"])
    pipe = build_pipeline(build_model(cfg), PipeModelDataParallelTopology(num_pp=2, num_mp=1, num_dp=1), method)
    return [type(m).__name__ + (f"{m.layer_index}" if hasattr(m, "layer_index") else "") for m in pipe.forward_funcs]


@pytest.mark.parametrize("method, expected", [
    ("uniform", [["EmbeddingStage", "BlockStage0", "BlockStage1", "BlockStage2"],
                 ["BlockStage3", "BlockStage4", "BlockStage5", "HeadStage"]]),
    ("type:BlockStage", [["EmbeddingStage", "BlockStage0", "BlockStage1", "BlockStage2"],
                         ["BlockStage3", "BlockStage4", "BlockStage5", "HeadStage"]]),
])
def test_stage_partitioning(method, expected):
    assert run_distributed(_stage_layers, 2, method) == expected


def test_parameter_partitioning_balances_parameters():
    stages = run_distributed(_stage_layers, 2, "parameters")
    assert [s[0] for s in stages] == ["EmbeddingStage", stages[1][0]]
    assert stages[1][-1] == "HeadStage"
    assert sum(len(s) for s in stages) == 8  # every layer on exactly one stage


def test_tied_embeddings_across_stages_match_one_process(tmp_path):
    args = TINY + ["--model.tie_embeddings=true", "--train.steps=4", "--train.micro_batch_size=2"]
    train(args + [f"--train.out_dir={tmp_path / 'one'}"])
    train(args + ["--parallel.pp=2", f"--train.out_dir={tmp_path / 'pp2'}"], launcher=torchrun(2))
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "pp2"), strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-6)
    from sparselm import load_model

    one, _ = load_model(tmp_path / "one")
    staged, _ = load_model(tmp_path / "pp2")
    assert staged.head.proj.weight is staged.embed.weight
    ids = torch.randint(0, 64, (1, 16))
    assert torch.allclose(one(ids), staged(ids), atol=1e-5)
