"""Training a MoE model end to end: one process against DP=4 x EP=2 (expert-data-parallel groups of 2)
under torchrun, with bias balancing on so that the per-step bias update (load counted over every rank)
takes part.  Same micro-batches, so the same losses, grad norms, expert loads and final checkpoint."""
import pytest

from support.run import checkpoint_tensors, torchrun, train
from sparselm.training.metrics import read_metrics

ARGS = ["--config", "tiny_moe", "--model.d_model=64", "--model.n_layers=2", "--model.n_heads=2",
        "--model.max_seq_len=32", "--data.seq_len=32", "--moe.num_experts=4", "--moe.bias_balancing=true",
        "--moe.bias_update_rate=0.01", "--train.steps=3", "--train.global_batch_size=8", "--train.micro_batch_size=2",
        "--train.eval_every=0", "--train.log_every=1", "--train.progress=false", "--train.tensorboard=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_train")
    train(ARGS + [f"--train.out_dir={root / 'one'}"])
    train(ARGS + [f"--train.out_dir={root / 'ep2'}", "--parallel.ep=2"], launcher=torchrun(4))
    return root


def test_dp_x_ep_matches_one_process(runs):
    one = [r for r in read_metrics(runs / "one") if "loss" in r]
    ep = [r for r in read_metrics(runs / "ep2") if "loss" in r]
    assert [r["step"] for r in ep] == [1, 2, 3]
    for a, b in zip(one, ep, strict=True):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), (a["step"], key)
        for key in (k for k in a if k.startswith("layer")):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)


def test_expert_load_is_logged_per_layer(runs):
    row = read_metrics(runs / "one")[0]
    for layer in (0, 1):
        load = row[f"layer{layer}/expert_load"]
        assert len(load) == 4 and sum(load) == pytest.approx(1.0)
        for name in ("load_max", "dropped_frac", "balance_loss", "z_loss"):
            assert f"layer{layer}/{name}" in row


def test_expert_parallel_checkpoint_is_the_one_process_checkpoint(runs):
    one, ep = (checkpoint_tensors(runs / name / "checkpoints" / "step_3") for name in ("one", "ep2"))
    assert one.keys() == ep.keys()
    assert one["layers.0.ffn.experts.gate_up_proj"].shape[0] == 4  # full, not one rank's 2 experts
    # The bias moved (three +-rate steps: they cannot all cancel) and was saved.
    assert one["layers.0.ffn.router.expert_bias"].abs().sum() > 0
    for name in one:
        assert ep[name].shape == one[name].shape, name
        assert (ep[name] - one[name]).abs().max() < 1e-5, name
