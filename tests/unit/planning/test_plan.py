"""sparselm.plan: exact per-rank parameters, ZeRO memory formulas, the search and bad input.

That the planner's pieces equal what each real rank builds (a multi-process construction on gloo) is
checked in tests/distributed/test_sharded_construction.py, which already starts those processes; here, with no process
group, every preset under every layout of the issue: each rank's pieces are the right cut of the
one-process meta model's tensors, the ranks of one model replica hold every tensor exactly once between
them, and the planner's count per rank is the sum of its pieces.
"""
import functools
import json
import math

import pytest

from sparselm.config import list_presets, load_config
from sparselm.data.vocab import derive_vocab_size

LAYOUTS = {  # name -> (world size, overrides)
    "1": (1, []),
    "tp2": (2, ["--parallel.tp=2"]),
    "pp2": (2, ["--parallel.pp=2"]),
    "ep2": (2, ["--parallel.ep=2"]),
    "tp2xpp2xdp2": (8, ["--parallel.tp=2", "--parallel.pp=2"]),
    "tp2xep2": (4, ["--parallel.tp=2", "--parallel.ep=2"]),
}
GPU_MEM = 80


def _cfg(preset, overrides):
    cfg = load_config(preset, overrides + ["--parallel.ep=1"] * ("--parallel.ep=2" not in overrides), check=False)
    derive_vocab_size(cfg)
    return cfg


@functools.lru_cache(maxsize=16)
def _one_process(preset, vocab):
    """The one-process meta model's parameters by every name (tied ones under both)."""
    from sparselm.model import build_model
    from sparselm.planning.holdings import one_thread

    cfg = _cfg(preset, [f"--model.vocab_size={vocab}"])
    with one_thread():
        return dict(build_model(cfg, device="meta").named_parameters(remove_duplicate=False))


# deepseek_v3_671b has tiny_deepseek's structure (MLA, MTP, dense-first MoE) at scale: its 61 x 256-expert meta
# model costs ~40 s here, so the holdings of that structure are checked on tiny_deepseek
HOLDINGS_PRESETS = [p for p in list_presets() if p != "deepseek_v3_671b"]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("preset", HOLDINGS_PRESETS)
def test_each_rank_holds_its_cut_of_every_tensor_once_per_replica(preset, layout):
    from sparselm.parallel.materialize import held_pieces
    from sparselm.parallel.pieces import piece, placements
    from sparselm.parallel.topology import VirtualTopology
    from sparselm.planning.holdings import one_thread
    from sparselm.planning.planner import plan_layout

    world, overrides = LAYOUTS[layout]
    cfg = _cfg(preset, overrides)
    full = _one_process(preset, cfg.model.vocab_size)
    plan = plan_layout(cfg, world, GPU_MEM)
    lay = plan.layout
    replica = [r for r in range(world) if lay.coord(r).dp < lay.ep]  # one copy of the model between them
    held = {}
    for r in replica:
        topo = VirtualTopology(lay, r)
        with one_thread():
            pieces = held_pieces(cfg, topo)
        groups = {"tp": topo.tp_group, "ep": topo.ep_group}
        for name, p in pieces.items():
            assert tuple(p.shape) == tuple(piece(full[name], placements(p), groups).shape), (r, name)
            held.setdefault(name, []).append((r, p.numel(), placements(p)))
        assert plan.ranks[r].params == sum(p.numel() for p in pieces.values()), r
        for twin in range(world):  # the other data-parallel replicas hold the same amount
            if lay.coord(twin).pp == lay.coord(r).pp:
                assert plan.ranks[twin].params == plan.ranks[r].params
    aliases = {"head.proj.weight"} if full["head.proj.weight"] is full["embed.weight"] else set()
    assert set(held) | aliases >= set(full) and set(held) <= set(full), set(full) ^ set(held)
    for name, parts in held.items():
        cuts = math.prod({"tp": lay.tp, "ep": lay.ep}[s.group] for s in parts[0][2])
        copies = len(parts) / cuts  # ranks of the replica holding the same piece (e.g. tp ranks for a norm)
        assert copies == int(copies) and sum(n for _, n, _ in parts) == full[name].numel() * copies, (name, parts)


def _states(rank):
    return sum(v for k, v in {**rank.gpu, **rank.host}.items()
               if k in ("weights", "gradients", "fp32 master + Adam + fp32 gradients", "gathered layer (ZeRO-3)"))


def _ds_json(tmp_path, stage, bf16=True, offload_opt=False, offload_param=False):
    zero = {"stage": stage}
    if offload_opt:
        zero["offload_optimizer"] = {"device": "cpu"}
    if offload_param:
        zero["offload_param"] = {"device": "cpu"}
    path = tmp_path / f"z{stage}{bf16:d}{offload_opt:d}{offload_param:d}.json"
    path.write_text(json.dumps({"bf16": {"enabled": bf16}, "zero_optimization": zero, "zero_allow_untested_optimizer": True}))
    return str(path)


def _largest_module(cfg):
    from sparselm.model import build_model

    model = build_model(cfg, device="meta")
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


@pytest.mark.parametrize("stage, offload", [(2, "none"), (2, "optimizer"), (3, "none"), (3, "optimizer"), (3, "params")])
def test_zero_memory_equals_deepspeeds_estimators(tmp_path, stage, offload):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    from sparselm.planning.planner import plan_layout

    n = 4
    cfg = _cfg("tiny_dense", [f"--parallel.ds_config={_ds_json(tmp_path, stage, True, offload != 'none', offload == 'params')}"])
    plan = plan_layout(cfg, n, GPU_MEM)
    rank = plan.ranks[0]
    total = rank.params  # tp = pp = 1: every rank holds the model
    gpu = sum(v for k, v in rank.gpu.items() if k not in ("runtime", "activations / step workspace"))
    host = sum(v for k, v in rank.host.items() if k != "process")
    if stage == 2:
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(total, n, 1, cpu_offload=offload != "none",
                                                               additional_buffer_factor=1)
    else:
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, _largest_module(cfg), n, 1, offload != "none",
                                                                  offload == "params", zero_init=True,
                                                                  additional_buffer_factor=1)
    assert gpu == pytest.approx(ds_gpu, abs=4)
    if stage == 3 and offload != "none":  # DeepSpeed's host figure is per node of n ranks
        assert host * n == pytest.approx(ds_cpu, abs=4 * n)


def test_zero0_and_zero1_by_hand(tmp_path):
    from sparselm.planning.planner import plan_layout

    fp32 = _cfg("tiny_dense", ["--parallel.ds_config=zero1"])
    p = plan_layout(fp32, 2, GPU_MEM).ranks[0].params
    # fp32 weights and gradients, DeepSpeed's fp32 partition with its gradient and Adam's two moments over dp 2
    assert _states(plan_layout(fp32, 2, GPU_MEM).ranks[0]) == 4 * p + 4 * p + 16 * p / 2
    assert _states(plan_layout(_cfg("tiny_dense", ["--parallel.ds_config=zero0"]), 2, GPU_MEM).ranks[0]) == (4 + 4 + 8) * p
    bf16_zero0 = _cfg("tiny_dense", [f"--parallel.ds_config={_ds_json(tmp_path, 0)}"])
    assert _states(plan_layout(bf16_zero0, 2, GPU_MEM).ranks[0]) == (2 + 2 + 16) * p
    # experts partition their optimizer state over the expert-data-parallel group (dp / ep), the rest over dp
    moe = _cfg("tiny_moe", ["--parallel.ep=2"])
    plan = plan_layout(moe, 4, GPU_MEM)
    stage = plan.stages[0]
    dense, expert = stage.params - stage.expert, stage.expert
    assert expert > 0 and _states(plan.ranks[0]) == 8 * stage.params + 16 * (dense / 4 + expert / 2)


def test_the_search_returns_only_layouts_the_trainer_accepts():
    from sparselm.training.engine import build_ds_config
    from sparselm.errors import ConfigError
    from sparselm.planning.advice import search
    from sparselm.planning.layouts import candidate_layouts, configure
    from sparselm.training.preflight import preflight

    cfg = load_config("tiny_mixed", ["--model.vocab_size=256", "--train.micro_batch_size=1"], check=False)
    world = 8
    fitting, refused, too_big = search(cfg, world, GPU_MEM, device="cpu", recompute_options=("none",), cp_options=(1, 2))
    assert fitting and refused  # tp=8 breaks the heads rule, for one
    accepted = {(p.layout.tp, p.layout.pp, p.layout.ep, p.layout.cp) for p in fitting + too_big}
    assert any(layout[3] == 2 for layout in accepted)
    for tp, pp, ep, cp in candidate_layouts(cfg, world, cp_options=(1, 2)):
        variant = configure(cfg, tp=tp, pp=pp, ep=ep, cp=cp)
        try:
            preflight(variant, world)  # the trainer's start-up checks
            build_ds_config(variant, world // (tp * pp * cp))
            ok = True
        except ConfigError:
            ok = False
        assert ok == ((tp, pp, ep, cp) in accepted), (tp, pp, ep, cp)
    times = [p.time["step_s"] for p in fitting]
    assert times == sorted(times)


def _main(capsys, *argv):
    from sparselm.planning.report import main

    code = 0
    try:
        main(list(argv))
    except SystemExit as err:
        code = err.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_json_for_one_layout_and_for_a_search(capsys):
    code, out, _ = _main(capsys, "--config", "tiny_moe", "--gpus", "4", "--ep", "2", "--json", "--device", "cpu")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["fits"] is True and len(result["ranks"]) == 4
    assert all(r["params"] > 0 and r["host_bytes"] > 0 and r["gpu_bytes"] == 0 for r in result["ranks"])
    assert "--peak-tflops" in out and "--mfu" in out  # every assumption printed with its flag
    code, out, _ = _main(capsys, "--config", "tiny_moe", "--gpus", "4", "--search", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["fits"] and result["layouts"]
    for lay in result["layouts"]:
        assert lay["tp"] * lay["pp"] * lay["dp"] == 4 and lay["dp"] % lay["ep"] == 0 and lay["fits"]
        assert len(lay["ranks"]) == 4 and all(r["gpu_bytes"] <= 80 * 2**30 for r in lay["ranks"])


def test_a_layout_the_project_cannot_run_names_the_rule(capsys):
    code, _, err = _main(capsys, "--config", "tiny_moe", "--gpus", "4", "--tp", "3")
    assert code == 2 and "parallel.tp" in err and "cannot run" in err


def test_a_gpu_count_no_layout_divides_names_counts_that_work(capsys):
    code, _, err = _main(capsys, "--config", "tiny_dense", "--gpus", "7", "--search")
    assert code == 2 and "no layout of 7 GPUs" in err and "6, 8" in err


def test_a_model_that_does_not_fit_gets_the_smallest_change(capsys):
    code, out, _ = _main(capsys, "--config", "tiny_moe", "--gpus", "2", "--gpu-mem", "0.085", "--gpu-runtime-gb", "0",
                         "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and result["fits"] is False and result["smallest_fix"].startswith("--parallel.ep=2")
    code, out, _ = _main(capsys, "--config", "tiny_moe", "--gpus", "2", "--gpu-mem", "0.001", "--search", "--json")
    result = json.loads(out.strip().splitlines()[-1])
    assert result["fits"] is False and "smallest_fix" in result and "no layout fits" in out


@pytest.mark.parametrize("ep", [1, 2])
def test_zero3_gathered_layer_counts_one_expert_module(ep):
    """Under ZeRO-3 the planner's gathered layer is the largest module as ZeRO-3 gathers it: a MoE layer's
    routed experts one expert at a time (parallel.zero3_experts_per_gather=1), the whole local experts with 0;
    expert parallelism under ZeRO-3 is planned, not refused."""
    from sparselm.model import build_model
    from sparselm.planning.planner import plan_layout

    layout = ["--parallel.ds_config=zero3"] + ["--parallel.ep=2"] * (ep == 2)
    per_expert = plan_layout(_cfg("tiny_moe", layout), 2, GPU_MEM).ranks[0].gpu["gathered layer (ZeRO-3)"]
    together = plan_layout(_cfg("tiny_moe", layout + ["--parallel.zero3_experts_per_gather=0"]), 2,
                           GPU_MEM).ranks[0].gpu["gathered layer (ZeRO-3)"]
    cfg = _cfg("tiny_moe", [])
    model = build_model(cfg, device="meta")
    direct = {n: sum(p.numel() for p in m.parameters(recurse=False)) for n, m in model.named_modules()}
    experts = max(v for n, v in direct.items() if n.endswith(".experts"))
    others = max(v for n, v in direct.items() if not n.endswith(".experts"))
    assert together == 4 * max(others, experts // ep)
    assert per_expert == 4 * max(others, experts // cfg.moe.num_experts)
    assert per_expert < together


def test_an_explicit_head_dim_equal_to_the_derived_width_changes_no_estimate():
    """model.head_dim=0 means d_model / n_heads: every estimate must use the resolved width (head_width)."""
    from sparselm.config import load_config
    from sparselm.planning.memory import stage_activations

    derived = load_config("tiny_mixed", ["--parallel.recompute=selective"])
    explicit = load_config("tiny_mixed", ["--parallel.recompute=selective",
                                          f"--model.head_dim={derived.model.d_model // derived.model.n_heads}"])
    layers = list(range(derived.model.n_layers))
    assert (stage_activations(derived, layers, 1, 4, 0.0)
            == stage_activations(explicit, layers, 1, 4, 0.0))
