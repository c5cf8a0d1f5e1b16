"""Activation recomputation (parallel.recompute none|full|selective) changes memory and time, never numbers.

Cases (together every block kind): tiny_mixed (dense, moe, pkm, all-attention), moe top-2 with a shared expert
and noisy gating, moe top-1 with capacity drops and bias balancing, pkm_ffn layers sharing a value table.  One
spawn of a one-process world trains every case 5 steps with recomputation none, full and selective and resumes
a recomputed run from its step-2 checkpoint; one spawn of a 4-rank gloo world trains none, full and selective
under tp2 (x dp2), ep2 (x dp4), pp2 (x dp2) and zero3 (dp4).  Losses, aux losses and gradient norms must equal
the same layout's run without recomputation at 1e-6 (fp32); so must every logged layer metric (expert load,
dropped fraction, balance and z-loss, PKM usage, step load maximum): a recomputed forward counts nothing twice
and routes (noise, drops) as the first.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.distributed import run_distributed

from test_zero3 import BASE, MOE, PKM  # the same small models as the ZeRO-3 equivalence tests
from sparselm.training.metrics import read_metrics

CASES = {
    "tiny_mixed": ("tiny_mixed", PKM + ["--attention.window=8", "--model.tie_embeddings=true", "--pkm.gated=true"]),
    "moe_noisy": ("tiny_moe", MOE + ["--moe.num_shared_experts=1", "--moe.noisy_gating=true"]),
    "moe_capacity_bias": ("tiny_moe", MOE + ["--moe.top_k=1", "--moe.renormalize=false", "--moe.drop_tokens=true",
                                             "--moe.capacity_factor=1.0", "--moe.bias_balancing=true"]),
    "pkm_ffn_shared": ("tiny_pkm", PKM + ["--model.n_layers=2", "--model.pattern=[pkm_ffn,pkm_ffn]",
                                          "--pkm.share_values=0,1"]),
}
MODES = ("none", "full", "selective")
LAYOUTS = {"1": [], "tp2": ["--parallel.tp=2"], "ep2": ["--parallel.ep=2"], "pp2": ["--parallel.pp=2"],
           "zero3": ["--parallel.ds_config=zero3"]}
WORLD_JOBS = [(case, layout, mode) for case, layout in (("tiny_mixed", "tp2"), ("moe_noisy", "ep2"),
                                                         ("tiny_mixed", "pp2"), ("tiny_mixed", "zero3"))
              for mode in MODES]
KEYS = ("loss", "lm_loss", "aux_loss", "grad_norm")


def _args(case, layout, mode, run_dir, extra=()):
    preset, overrides = CASES[case]
    return ["--config", preset, *BASE, *overrides, *LAYOUTS[layout], f"--parallel.recompute={mode}",
            f"--train.out_dir={run_dir}", *extra]


def _train(rank, world, jobs, out, resume):
    from sparselm.train import main

    rows = {}
    for job in jobs:
        run_dir = Path(out) / "-".join(job)
        main(_args(*job, run_dir))
        rows[job] = read_metrics(run_dir, train_only=True) if rank == 0 else None
    if resume:  # recomputation on: 4 steps saving at 2, then resumed from step 2
        full, resumed = Path(out) / "resume-full", Path(out) / "resume-resumed"
        main(_args("tiny_mixed", "1", "full", full, ["--train.steps=4", "--train.save_every=2"]))
        main(_args("tiny_mixed", "1", "full", resumed, ["--train.steps=4", f"--train.resume={full}/checkpoints/step_2"]))
        rows["resume"] = (read_metrics(full, train_only=True), read_metrics(resumed, train_only=True))
    return rows


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict:
    jobs = [(case, "1", mode) for case in CASES for mode in MODES]
    return run_distributed(_train, 1, jobs, str(tmp_path_factory.mktemp("recompute1")), True)[0]


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory) -> dict:
    return run_distributed(_train, 4, WORLD_JOBS, str(tmp_path_factory.mktemp("recompute4")), False)[0]


def assert_same(rows, ref, tol=1e-6):
    assert [r["step"] for r in rows] == [r["step"] for r in ref] and len(ref) >= 2
    for got, want in zip(rows, ref):
        layer_keys = [k for k in want if k.startswith("layer")]
        assert layer_keys or "layer" not in json.dumps(list(want))
        assert set(layer_keys) == {k for k in got if k.startswith("layer")}
        for key in (*KEYS, *layer_keys):
            assert got[key] == pytest.approx(want[key], rel=tol, abs=1e-9), (got["step"], key)


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("case", list(CASES))
def test_recomputation_changes_no_number_in_one_process(one_process, case, mode):
    assert_same(one_process[(case, "1", mode)], one_process[(case, "1", "none")])


def test_statistics_are_logged_and_routing_drops(one_process):
    """The cases exercise what recomputation could double or redraw: load, drops, PKM usage, noisy gates."""
    mixed = one_process[("tiny_mixed", "1", "full")][0]
    assert any(k.endswith("/pkm_read_frac") for k in mixed) and any(k.endswith("/expert_load") or
                                                                     "expert_load" in k for k in mixed)
    capacity = one_process[("moe_capacity_bias", "1", "full")]
    assert max(r[k] for r in capacity for k in r if k.endswith("dropped_frac")) > 0
    assert any(k.endswith("load_max") for k in capacity[0])


def test_resume_with_recomputation_is_exact(one_process):
    full, resumed = one_process["resume"]
    assert [r["step"] for r in resumed] == [3, 4]
    assert_same(resumed, full[2:])


@pytest.mark.parametrize("mode", ["full", "selective"])
@pytest.mark.parametrize("case, layout", sorted({(c, lay) for c, lay, _ in WORLD_JOBS}))
def test_recomputation_changes_no_number_under_each_layout(four_ranks, case, layout, mode):
    assert_same(four_ranks[(case, layout, mode)], four_ranks[(case, layout, "none")])


def test_recompute_every_larger_than_the_layers_is_refused():
    from sparselm.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"parallel.recompute_every=5 is larger than the 4 layers \(model.n_layers\)"):
        load_config("tiny_mixed", ["--parallel.recompute=full", "--parallel.recompute_every=5"])
    with pytest.raises(ConfigError, match="replaced by parallel.recompute=full with parallel.recompute_every=N"):
        load_config("tiny_mixed", ["--parallel.activation_checkpoint_interval=1"])
    with pytest.raises(ConfigError, match=r"train.compile=true with parallel.recompute='selective'"):
        load_config("tiny_mixed", ["--parallel.recompute=selective", "--train.compile=true"])


def test_recompute_every_picks_every_nth_block():
    from sparselm.config import load_config
    from sparselm.model import build_model
    from sparselm.parallel.recompute import RecomputedBlock, apply_recompute

    cfg = load_config("tiny_mixed", ["--parallel.recompute=selective", "--parallel.recompute_every=2",
                                     "--model.vocab_size=64", "--model.mtp_layers=3"])
    model = apply_recompute(build_model(cfg, device="meta"), cfg)
    assert [isinstance(b, RecomputedBlock) for b in model.layers] == [False, True, False, True]
    # the multi-token-prediction depths' blocks are layers 4, 5, 6
    assert [isinstance(depth.block, RecomputedBlock) for depth in model.mtp] == [False, True, False]
    assert model.layers[1].recompute == model.mtp[1].block.recompute == "selective"
    names = {n for n, _ in build_model(cfg, device="meta").named_parameters()}
    assert {n for n, _ in model.named_parameters()} == names  # checkpoints keep their names


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_counters_equal_a_run_without_recomputation(mode):
    """Expert load counters, PKM slot usage and the noisy router's token position after forward and backward
    (where the recomputation ran) equal those of the same step without recomputation; so do all gradients."""
    import torch

    from sparselm.config import load_config
    from sparselm.model import build_model
    from sparselm.model.moe.layer import MoELayer
    from sparselm.model.moe.router import Router
    from sparselm.model.pkm.usage import SlotUsage
    from sparselm.parallel.recompute import apply_recompute

    overrides = [*BASE, *PKM, "--attention.window=8", "--moe.noisy_gating=true", "--moe.drop_tokens=true",
                 "--moe.capacity_factor=1.0", "--model.vocab_size=96"]
    ids = torch.randint(0, 96, (2, 16), generator=torch.Generator().manual_seed(0))
    state = {}
    for recompute in ("none", mode):
        cfg = load_config("tiny_mixed", overrides + [f"--parallel.recompute={recompute}"])
        model = apply_recompute(build_model(cfg), cfg)
        with torch.no_grad():  # a nonzero noise scale, so the noise matters
            for m in model.modules():
                if isinstance(m, Router):
                    m.noise_weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        model.train()
        model(ids, ids).loss.backward()
        state[recompute] = {
            "load": [m.load_since_update.clone() for m in model.modules() if isinstance(m, MoELayer)],
            "usage": [(u.pending.clone(), u.last_read.clone()) for u in model.modules() if isinstance(u, SlotUsage)],
            "position": [m.next_position for m in model.modules() if isinstance(m, Router)],
            "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
            "metrics": model.metrics(),
        }
    ref, got = state["none"], state[mode]
    assert ref["load"] and ref["usage"] and ref["position"] == got["position"] == [2 * 16]
    for a, b in zip(ref["load"], got["load"]):
        assert torch.equal(a, b)
    for (pa, la), (pb, lb) in zip(ref["usage"], got["usage"]):
        assert torch.equal(pa, pb) and torch.equal(la, lb)
    for name, grad in ref["grads"].items():
        torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=1e-9, msg=name)
    assert ref["metrics"].keys() == got["metrics"].keys()
    for name, value in ref["metrics"].items():
        torch.testing.assert_close(got["metrics"][name], value, rtol=1e-6, atol=1e-9, msg=name)
