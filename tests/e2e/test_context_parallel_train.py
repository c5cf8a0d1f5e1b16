"""Training under context parallelism end to end: two pipeline stages of cp2 with the experts folded over the
context-parallel pair (pp2 x cp2 x ep2; torchrun, 4 ranks) against one process on the same batches (losses,
grad norms, MoE metrics and bias balancing, validation loss), and its checkpoint resumed by one process giving
its next step.  (The reverse, cp1 resumed at cp2 with ZeRO-2, was checked by hand.)"""
import pytest

from support.run import torchrun, train
from sparselm.training.metrics import read_metrics

ARGS = ["--config", "tiny_dense", "--model.d_model=64", "--model.n_layers=2", "--model.n_heads=4",
        "--model.n_kv_heads=2", "--model.max_seq_len=32", "--data.seq_len=32", "--model.pattern=moe,dense",
        "--moe.num_experts=4", "--moe.top_k=2", "--moe.bias_balancing=true", "--moe.bias_update_rate=0.01",
        "--train.steps=3", "--train.global_batch_size=4", "--train.save_every=2", "--train.eval_every=3",
        "--train.eval_batches=1", "--train.log_every=1", "--train.progress=false", "--train.tensorboard=false"]
TIMING = {"tokens_per_s", "tflops", "mfu"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cp_train")
    train(ARGS + [f"--train.out_dir={root / 'cp2'}", "--parallel.cp=2", "--parallel.ep=2", "--parallel.pp=2"],
          launcher=torchrun(4))
    train(ARGS + [f"--train.out_dir={root / 'one'}"])
    train(ARGS + [f"--train.out_dir={root / 'resumed'}", f"--train.resume={root / 'cp2' / 'checkpoints' / 'step_2'}"])
    return root


def _same(a: dict, b: dict, where) -> None:
    assert a.keys() == b.keys(), where
    for key in a.keys() - TIMING:
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (where, key)


def test_cp2_trains_as_one_process_and_resumes_at_cp1(runs):
    one, cp2, resumed = (read_metrics(runs / name) for name in ("one", "cp2", "resumed"))
    assert [r["step"] for r in cp2] == [0, 1, 2, 3] and "val_loss" in cp2[-1] and "layer0/balance_loss" in cp2[-1]
    for a, b in zip(one, cp2, strict=True):
        _same(a, b, a["step"])
    assert resumed[-1]["step"] == 3
    _same(cp2[-1], resumed[-1], "resumed")
