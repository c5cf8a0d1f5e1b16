"""Layout invariance: every parallel layout trains the mixed model (dense, MoE, PKM, all-attention)
with the same losses, auxiliary losses and gradient norms as one process (fp32, 5 steps), under default
settings: the micro-batch is derived (global batch / dp) unless a layout sets another one, so layouts also
differ in micro-batch size and gradient accumulation.

Each layout is a real multi-process run on gloo, started by torchrun or by the deepspeed launcher, once per
module and only when a selected test needs it (``pytest -k tp2`` trains the one-process reference and tp2)."""
import pytest

from support.run import deepspeed_launcher, torchrun, train
from sparselm.training.metrics import read_metrics

ARGS = ["--config", "tiny_mixed", "--train.steps=5", "--train.eval_every=0", "--train.progress=false",
        "--train.tensorboard=false", "--train.save_every=2", "--train.keep_last=0"]
MICRO2, MICRO1 = "--train.micro_batch_size=2", "--train.micro_batch_size=1"

# name: (processes, overrides, launcher); tiny_mixed's global batch is 8, so the reference takes one micro-batch
# of 8 and e.g. dp2 two ranks of 4.  Pipeline layouts set small micro-batches so that the schedule pipelines.
LAYOUTS = {
    "1": (1, [], None),
    "1_micro2": (1, [MICRO2], None),
    "dp2": (2, [], "torchrun"),
    "tp2": (2, ["--parallel.tp=2"], "torchrun"),
    "pp2": (2, ["--parallel.pp=2", MICRO2], "torchrun"),
    "ep2_dp2": (2, ["--parallel.ep=2"], "deepspeed"),
    "tp2_pp2": (4, ["--parallel.tp=2", "--parallel.pp=2", MICRO2], "deepspeed"),
    "tp2_ep2": (4, ["--parallel.tp=2", "--parallel.ep=2"], "torchrun"),
    "pp2_ep2": (4, ["--parallel.pp=2", "--parallel.ep=2"], "torchrun"),
    "tp2_pp2_dp2": (8, ["--parallel.tp=2", "--parallel.pp=2", MICRO1], "torchrun"),
}
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(name)``: the metrics of layout ``name``, trained on first use; ``runs.root / name`` its run dir."""
    root = tmp_path_factory.mktemp("layouts")
    cache = {}

    def get(name: str) -> list[dict]:
        if name not in cache:
            procs, overrides, launcher = LAYOUTS[name]
            train(ARGS + overrides + [f"--train.out_dir={root / name}"], launcher=launcher_prefix(launcher, procs))
            cache[name] = [r for r in read_metrics(root / name) if "loss" in r]
        return cache[name]

    get.root = root
    return get


def launcher_prefix(launcher: str | None, procs: int) -> list[str] | None:
    if launcher == "torchrun":
        return torchrun(procs)
    if launcher == "deepspeed":
        return deepspeed_launcher(procs)
    return None


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != "1"])
def test_layout_matches_one_process(runs, layout):
    reference, other = runs("1"), runs(layout)
    assert [r["step"] for r in other] == [1, 2, 3, 4, 5]
    for ref, row in zip(reference, other):
        for key in KEYS:
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (layout, row["step"], key)
        # per-layer metrics (expert load, PKM usage, ...) are global-batch averages too
        for key in ref:
            if key.startswith("layer"):
                assert row[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), (layout, row["step"], key)


def test_the_mixed_model_has_every_layer_kind_and_aux_losses(runs):
    first = runs("1")[0]
    assert first["aux_loss"] > 0
    assert any(k.startswith("layer1/") for k in first)  # MoE metrics
    assert any(k.startswith("layer2/") for k in first)  # PKM metrics


# Resharding: a checkpoint saved at step 2 under one layout resumes under another, optimizer state
# included. Step 3 checks the weights; steps 4 and 5 also check the Adam moments and step count.
RESHARD = {
    "tp2_to_tp1": ("tp2", 1, []),
    "pp2_to_pp1": ("pp2", 1, []),
    "ep2_to_ep1": ("ep2_dp2", 2, []),
    "ep1_to_ep2": ("dp2", 2, ["--parallel.ep=2"]),
    "dp2_to_dp1": ("dp2", 1, []),
    "tp2_pp2_dp2_to_ep2_dp2": ("tp2_pp2_dp2", 2, ["--parallel.ep=2"]),
    "ep2_to_tp2_ep2": ("ep2_dp2", 4, ["--parallel.tp=2", "--parallel.ep=2"]),  # experts cut by width on load
    "tp2_to_tp2_rows": ("tp2", 2, ["--parallel.tp=2", "--parallel.moe_tp_mode=rows"]),  # one format, both modes
    "pp2_to_tp2_ep2": ("pp2", 4, ["--parallel.tp=2", "--parallel.ep=2"]),
}


@pytest.mark.parametrize("case", list(RESHARD))
def test_checkpoint_resumes_under_another_layout(runs, tmp_path, case):
    source, procs, overrides = RESHARD[case]
    runs(source)
    checkpoint = runs.root / source / "checkpoints" / "step_2"
    train(ARGS + overrides + [f"--train.out_dir={tmp_path}", f"--train.resume={checkpoint}"],
          launcher=launcher_prefix("torchrun" if procs > 1 else None, procs))
    resumed = [r for r in read_metrics(tmp_path) if "loss" in r]
    assert [r["step"] for r in resumed] == [3, 4, 5]
    for ref, row in zip(runs("1")[2:], resumed):
        for key in KEYS:
            assert row[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-7), (case, row["step"], key)
