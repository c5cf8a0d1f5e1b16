"""ZeRO stage 3, with and without CPU offload of parameters and optimizer, for every block kind.

Cases (together every block kind): tiny_mixed (dense, moe top-2 dropless, gated pkm, all-attention with
persistent memory; tied embeddings), moe top-2 with a shared expert and noisy gating, moe top-1 with
capacity drops and bias balancing, pkm_ffn layers sharing one value table.  One spawn of a one-process
world trains every case under zero1 (the reference); one spawn of a 4-rank gloo world trains each case
under zero3 and zero3_offload (data-parallel 4, so every parameter is partitioned over 4 ranks), the MoE
cases also with expert parallelism 2 inside data-parallel 4 (experts partitioned over their
expert-data-parallel group of 2), resumes a ZeRO-3 run through the command line, and builds two cases
the way the trainer does with a probe counting whole parameters while building.  The
tests read those runs' metrics: 5 steps equal the one-process zero1 run at 1e-5 (loss, lm loss, aux
loss, gradient norm; fp32, clipping active).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from support.distributed import run_distributed

WORLD = 4
BASE = ["--model.d_model=32", "--model.n_heads=2", "--data.seq_len=16", "--model.max_seq_len=16",
        "--train.global_batch_size=4", "--train.steps=5", "--train.progress=false", "--train.tensorboard=false",
        "--train.eval_every=0", "--train.log_every=1", "--train.save_every=0", "--model.vocab_size=0",
        "--optim.grad_clip=0.05"]
MOE = ["--model.n_layers=2", "--moe.num_experts=4", "--moe.expert_hidden=32"]
PKM = ["--pkm.n_keys=256", "--pkm.knn=8", "--pkm.k_dim=16"]
CASES = {  # together: every block kind and variant the issue names
    "tiny_mixed": ("tiny_mixed", PKM + ["--attention.window=8", "--model.tie_embeddings=true", "--pkm.gated=true"]),
    "moe_top2_shared_noisy": ("tiny_moe", MOE + ["--moe.num_shared_experts=1", "--moe.noisy_gating=true"]),
    "moe_top1_capacity_bias": ("tiny_moe", MOE + ["--moe.top_k=1", "--moe.renormalize=false", "--moe.drop_tokens=true",
                                                  "--moe.capacity_factor=1.0", "--moe.bias_balancing=true",
                                                  "--moe.num_shared_experts=0"]),
    "pkm_ffn_shared_values": ("tiny_pkm", PKM + ["--model.n_layers=2", "--model.pattern=[pkm_ffn,pkm_ffn]",
                                                 "--pkm.share_values=0,1"]),
}
SETTINGS = {
    "zero1": ["--parallel.ds_config=zero1"],
    "micro1": ["--parallel.ds_config=zero1", "--train.micro_batch_size=1"],
    "zero3": ["--parallel.ds_config=zero3"],
    "zero3_offload": ["--parallel.ds_config=zero3_offload"],
    "ep2_zero3": ["--parallel.ds_config=zero3", "--parallel.ep=2"],
    "ep2_zero3_offload": ["--parallel.ds_config=zero3_offload", "--parallel.ep=2"],
    "tp2_zero3_offload": ["--parallel.ds_config=zero3_offload", "--parallel.tp=2"],
}
EXPERT_PARALLEL = [("moe_top2_shared_noisy", "ep2_zero3_offload"), ("moe_top1_capacity_bias", "ep2_zero3")]
TENSOR_PARALLEL = [("tiny_mixed", "tp2_zero3_offload")]  # every block kind's TP rules, experts by width
RESUME = ["--config", "tiny_mixed", *BASE, *PKM, "--attention.window=8", "--parallel.ds_config=zero3_offload"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


def _train_cases(rank, world, jobs, out):
    """Train each (case, setting) in this world with the real Trainer; returns (metrics rows of each run,
    the ZeRO partition-group size of each expert-parallel run's expert and other parameters)."""
    import torch.distributed as dist

    from sparselm.config import load_config
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    from sparselm.training.trainer import Trainer

    partition = {}
    for case, setting in jobs:
        preset, overrides = CASES[case]
        run_dir = Path(out) / f"{case}-{setting}-{world}"
        cfg = load_config(preset, BASE + overrides + SETTINGS[setting] + [f"--train.out_dir={run_dir}"])
        trainer = Trainer(cfg)
        try:
            if setting.startswith("ep2"):
                sizes = {}
                for p in trainer.engine.module.parameters():
                    family = getattr(p, "ds_zero_placement_family", "replicated")
                    sizes.setdefault(family, set()).add(dist.get_world_size(p.ds_process_group))
                partition[(case, setting)] = sizes
            trainer.run()
        finally:
            trainer.close()
    rows = {job: _rows(Path(out) / f"{job[0]}-{job[1]}-{world}") for job in jobs} if rank == 0 else None
    return rows, partition


def _resume_through_cli(rank, world, out):
    """A ZeRO-3 (offload) run of 4 steps saving at step 2, then a new run resumed from step 2 through
    ``sparselm.train.main`` with --train.resume, under ZeRO-3 and under ZeRO-1; then a ZeRO-1 run saving at
    step 2 resumed under ZeRO-3; returns the runs' metrics."""
    from sparselm.train import main

    full, resumed, zero1 = Path(out) / "full", Path(out) / "resumed", Path(out) / "zero1"
    step2 = full / "checkpoints" / "step_2"
    main(RESUME + ["--train.steps=4", "--train.save_every=2", f"--train.out_dir={full}"])
    main(RESUME + ["--train.steps=4", f"--train.resume={step2}", f"--train.out_dir={resumed}"])
    main(RESUME + ["--train.steps=4", f"--train.resume={step2}", f"--train.out_dir={zero1}",
                   "--parallel.ds_config=zero1"])  # the same checkpoint under ZeRO-1 (the last flag wins)
    # and the other way: a ZeRO-1 run's checkpoint (whole experts) resumed under ZeRO-3 (experts in gather chunks)
    full1, into3 = Path(out) / "full_zero1", Path(out) / "zero1_into_zero3"
    main(RESUME + ["--train.steps=4", "--train.save_every=2", f"--train.out_dir={full1}", "--parallel.ds_config=zero1"])
    main(RESUME + ["--train.steps=4", f"--train.resume={full1 / 'checkpoints' / 'step_2'}", f"--train.out_dir={into3}"])
    return (_rows(full), _rows(resumed), _rows(zero1), _rows(full1), _rows(into3)) if rank == 0 else None


def _construction(rank, world):
    """Build each ZeRO-3 case the way the trainer does (``build_sharded`` with a ``Zero3Partitioner``) with a
    partitioner that looks, before partitioning each parameter, at how many of the module's parameters hold
    whole values; returns per case that count's maximum, the elements held after the build (partitions and
    data) and the whole model's, and the partition-group sizes of expert and other parameters."""
    import torch.distributed as dist

    from sparselm.config import load_config
    from sparselm.training.engine import build_ds_config
    from sparselm.parallel.expert import moe_layers
    from sparselm.parallel.materialize import build_sharded
    from sparselm.parallel.topology import Topology
    from sparselm.parallel.zero3 import Zero3Partitioner

    class Probe(Zero3Partitioner):
        def prepare(self, model):
            super().prepare(model)
            self.model, self.most_whole = model, 0

        def partition(self, param):
            whole = [p for p in self.model.parameters() if not p.is_meta and not hasattr(p, "ds_id")]
            self.most_whole = max(self.most_whole, len(whole))
            super().partition(param)

    report = {}
    for case, setting in [("tiny_mixed", "zero3"), ("moe_top2_shared_noisy", "ep2_zero3_offload")]:
        preset, overrides = CASES[case]
        cfg = load_config(preset, BASE + overrides + SETTINGS[setting] + ["--model.vocab_size=256"])
        topo = Topology(cfg)
        try:
            probe = Probe(build_ds_config(cfg, topo.dp_size), topo)
            model = build_sharded(cfg, topo, partitioner=probe)
            params = list({id(p): p for p in model.parameters()}.values())
            groups = {}
            for p in params:
                family = getattr(p, "ds_zero_placement_family", "replicated")
                groups.setdefault(family, set()).add(dist.get_world_size(p.ds_process_group))
            report[(case, setting)] = dict(
                most_whole=probe.most_whole, partitioned=all(hasattr(p, "ds_id") for p in params),
                partitions=sum(p.ds_tensor.numel() for p in params), data=sum(p.data.numel() for p in params),
                total=sum(p.ds_numel for p in params), params=len(params), groups=groups,
                chunks=[len(layer.experts.chunks) for layer in moe_layers(model)])
        finally:
            topo.teardown()
    return report


def _sharded_world(rank, world, jobs, out):
    return _train_cases(rank, world, jobs, out), _resume_through_cli(rank, world, out), _construction(rank, world)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """Metrics of every case under one-process zero1 (and micro-batches of 1 for noisy gating)."""
    jobs = [(case, "zero1") for case in CASES] + [("moe_top2_shared_noisy", "micro1")]
    return run_distributed(_train_cases, 1, jobs, str(tmp_path_factory.mktemp("zero3-ref")))[0][0]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """(metrics of every 4-rank run, expert-parallel partition group sizes, the resume runs' metrics)."""
    jobs = [(case, s) for case in CASES for s in ("zero3", "zero3_offload")] + EXPERT_PARALLEL + TENSOR_PARALLEL
    results = run_distributed(_sharded_world, WORLD, jobs, str(tmp_path_factory.mktemp("zero3")))
    (rows, partition), resume, _ = results[0]
    return rows, partition, resume, [r[2] for r in results]


def assert_same_run(rows, ref, tol=1e-5):
    assert len(rows) == len(ref) == 5
    for got, want in zip(rows, ref):
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=tol, abs=1e-9), (got["step"], key)


@pytest.mark.parametrize("setting", ["zero3", "zero3_offload"])
@pytest.mark.parametrize("case", list(CASES))
def test_zero3_trains_every_block_kind_as_one_process(reference, sharded, case, setting):
    rows, *_ = sharded
    assert_same_run(rows[(case, setting)], reference[(case, "zero1")])


@pytest.mark.parametrize("case, setting", EXPERT_PARALLEL)
def test_expert_parallel_zero3_partitions_experts_over_their_group(reference, sharded, case, setting):
    rows, partition, *_ = sharded
    assert_same_run(rows[(case, setting)], reference[(case, "zero1")])
    # experts over the expert-data-parallel group (4 / ep 2), everything else over all data-parallel ranks
    assert partition[(case, setting)] == {"autoep_expert": {WORLD // 2}, "replicated": {WORLD}}


@pytest.mark.parametrize("case, setting", TENSOR_PARALLEL)
def test_tensor_parallel_zero3_equals_one_process(reference, sharded, case, setting):
    """tp2 x dp2 under ZeRO-3 offload: pieces cut by megatron's rules (experts by hidden width, each
    expert its own gathered module), partitioned over the data-parallel pair."""
    rows, *_ = sharded
    assert_same_run(rows[(case, setting)], reference[(case, "zero1")])


@pytest.mark.parametrize("case, setting", [("tiny_mixed", "zero3"), ("moe_top2_shared_noisy", "ep2_zero3_offload")])
def test_zero3_construction_never_holds_the_whole_model(sharded, case, setting):
    """Each parameter is partitioned as soon as it is filled: while building, a rank holds at most one whole
    parameter (the one being partitioned) besides its partitions, and the engine receives every parameter
    partitioned (experts over their expert-data-parallel group under ep2)."""
    *_, construction = sharded
    for rank, report in enumerate(construction):
        got = report[(case, setting)]
        assert got["most_whole"] == 1, rank
        assert got["partitioned"] and got["data"] == 0, rank
        share = got["total"] / WORLD if setting == "zero3" else None
        if share is not None:  # every tensor over 4 ranks: a quarter, plus at most 3 padding elements each
            assert share <= got["partitions"] <= share + 3 * got["params"], rank
        else:  # experts over 2 ranks, the rest over 4: between a quarter and a half of the model
            assert got["total"] / WORLD < got["partitions"] < got["total"] / 2, rank
        assert got["groups"] == ({"replicated": {WORLD}} if setting == "zero3"
                                 else {"autoep_expert": {WORLD // 2}, "replicated": {WORLD}}), rank
        # one gathered module per local expert (parallel.zero3_experts_per_gather=1): 4 experts, or 2 under ep2
        assert got["chunks"] == ([4] if setting == "zero3" else [2, 2]), rank


def test_experts_in_gather_chunks_compute_the_same_numbers():
    """Experts split into per-expert modules (what ZeRO-3 gathers apart) give the outputs and weight gradients
    of the grouped module, on both computation paths, including a chunk no row is routed to."""
    from itertools import product

    import torch

    from sparselm.model.moe.experts import GroupedExperts
    from sparselm.parallel.zero3 import gather_chunk

    torch.manual_seed(0)
    # an expert of each chunk without rows; then a whole chunk without rows (it still gets zero gradients)
    for impl, counts in product(("grouped_mm", "padded"), (torch.tensor([3, 0, 0, 5]), torch.tensor([3, 5, 0, 0]))):
        whole = GroupedExperts(4, 16, 8, impl=impl)
        whole.reset_parameters()
        chunked = GroupedExperts(4, 16, 8, impl=impl)
        chunked.load_state_dict(whole.state_dict())
        chunked.split_into_chunks(2, gather_chunk)
        x = torch.randn(int(counts.sum()), 16)
        out_whole, out_chunked = whole(x, counts), chunked(x, counts)
        torch.testing.assert_close(out_chunked, out_whole, rtol=1e-6, atol=1e-7)
        out_whole.square().sum().backward()
        out_chunked.square().sum().backward()
        for name in ("gate_up_proj", "down_proj"):
            grad = torch.cat([getattr(c, name).grad for c in chunked.chunks])
            torch.testing.assert_close(grad, getattr(whole, name).grad, rtol=1e-6, atol=1e-7)
        assert [c.gate_up_proj.placements[-1].fixed for c in chunked.chunks] == [(0, 2), (1, 2)]
    with pytest.raises(ValueError, match="cannot be split into 3 equal chunks"):
        GroupedExperts(4, 16, 8).split_into_chunks(3, gather_chunk)


def test_experts_per_gather_must_divide_the_local_experts_under_zero3():
    from sparselm.config import ConfigError, load_config
    from sparselm.training.engine import build_ds_config

    def ds(*overrides):
        return build_ds_config(load_config("tiny_moe", ["--moe.num_experts=4", *overrides]), 1)

    with pytest.raises(ConfigError, match=r"zero3_experts_per_gather=3 under ZeRO stage 3 .* does not divide the 4 "
                                          r"experts .* pick one of \[1, 2, 4\]"):
        ds("--parallel.zero3_experts_per_gather=3", "--parallel.ds_config=zero3")
    for fine in (["--parallel.zero3_experts_per_gather=3"],  # ignored below stage 3
                 ["--parallel.zero3_experts_per_gather=0", "--parallel.ds_config=zero3"],
                 ["--parallel.zero3_experts_per_gather=8", "--parallel.ds_config=zero3"]):  # more than held: one module
        assert ds(*fine)["zero_optimization"]
    with pytest.raises(ConfigError, match="zero3_experts_per_gather must be >= 0"):
        load_config("tiny_moe", ["--parallel.zero3_experts_per_gather=-1"])


def test_noisy_gating_does_not_depend_on_the_layout(reference, sharded):
    """Noise keyed by token: 4 micro-batches of 1 and 4 data-parallel ranks draw the one-process noise."""
    ref = reference
    assert_same_run(ref[("moe_top2_shared_noisy", "micro1")], ref[("moe_top2_shared_noisy", "zero1")])
    rows, *_ = sharded
    assert_same_run(rows[("moe_top2_shared_noisy", "zero3")], ref[("moe_top2_shared_noisy", "zero1")])


def test_noise_is_keyed_by_step_and_token_not_by_generator_state():
    import torch

    from sparselm.model.moe.noise import keyed_normal

    positions = torch.arange(1000, 1064)
    a = keyed_normal(7, 3, positions, 4)
    torch.manual_seed(123)
    assert torch.equal(a, keyed_normal(7, 3, positions, 4))
    assert torch.equal(a[10:20], keyed_normal(7, 3, positions[10:20], 4))  # a split draws the same values
    assert not torch.equal(a, keyed_normal(7, 4, positions, 4)) and not torch.equal(a, keyed_normal(8, 3, positions, 4))
    many = keyed_normal(0, 0, torch.arange(20000), 8)
    assert abs(many.mean().item()) < 0.02 and abs(many.std().item() - 1) < 0.02


def test_zero3_resume_through_the_command_line_is_exact(sharded):
    _, _, (full, resumed, *_), _ = sharded
    assert [r["step"] for r in resumed] == [3, 4]
    for got, want in zip(resumed, full[2:], strict=True):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-6), (got["step"], key)


def test_zero3_checkpoint_resumes_under_zero1(sharded):
    """The checkpoint is layout-free: ZeRO-1 (torch AdamW instead of CPU Adam) continues the ZeRO-3 run."""
    _, _, (full, _, zero1, *_), _ = sharded
    assert [r["step"] for r in zero1] == [3, 4]
    for got, want in zip(zero1, full[2:], strict=True):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)


def test_zero1_checkpoint_resumes_under_zero3(sharded):
    """A ZeRO-1 checkpoint (experts stored whole) continues under ZeRO-3 offload, where each rank reads only
    the boxes of its partitions of every gather chunk."""
    _, _, (*_, full1, into3), _ = sharded
    assert [r["step"] for r in into3] == [3, 4]
    for got, want in zip(into3, full1[2:], strict=True):
        for key in ("loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (got["step"], key)


@pytest.mark.parametrize("overrides, world, needles", [
    (["--parallel.pp=2", "--parallel.ds_config=zero3_offload"], 2,
     ["parallel.pp=2 with ZeRO stage 3", "incompatible with pipeline parallelism", "--parallel.zero_stage=1"]),
    (["--parallel.pp=2", "--parallel.ds_config=zero2_offload"], 2, ["ZeRO stage 2", "--parallel.zero_stage=1"]),
    (["--parallel.tp=2", "--parallel.ep=2", "--parallel.ds_config=zero3_offload"], 4,
     ["parallel.ep=2 with parallel.tp=2 under ZeRO stage 3", "_grad_norm_counts_every_rank", "parallel.ds_config=zero1"]),
])
def test_combinations_deepspeed_cannot_run_stop_at_start_up(tmp_path, monkeypatch, overrides, world, needles):
    """Refused by the command line before any process group or DeepSpeed import, naming the rule and a fix."""
    from sparselm.errors import ConfigError
    from sparselm.train import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError) as err:
        main(["--config", "tiny_mixed", f"--train.out_dir={tmp_path}", *overrides])
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "config.yaml").exists()


def test_pipeline_with_zero1_keeps_optimizer_offload():
    """What the pipeline error proposes is accepted: ZeRO-1 with the JSON's CPU optimizer offload."""
    from sparselm.config import load_config
    from sparselm.training.engine import build_ds_config, offloads_optimizer

    cfg = load_config("tiny_mixed", ["--parallel.pp=2", "--parallel.ds_config=zero2_offload", "--parallel.zero_stage=1"])
    ds = build_ds_config(cfg, 1)
    assert ds["zero_optimization"]["stage"] == 1 and offloads_optimizer(ds)
    cfg.parallel.zero_stage = 0  # what a pipeline whose stages hold different parameter groups falls back to
    assert not offloads_optimizer(build_ds_config(cfg, 1))


def test_largest_model_search_finds_the_boundary():
    """bench_offload --largest's search (doubling, then bisection) on a known boundary, with few trials."""
    from tools.bench_offload import largest_fitting

    for boundary in (4, 5, 37, 64, 1000):
        tried = []

        def fits(n):
            tried.append(n)
            return n <= boundary

        assert largest_fitting(fits, 4, 1000) == boundary
        assert len(tried) <= 2 * 9 + 1, tried
    assert largest_fitting(lambda n: False, 4, 1000) is None
    assert largest_fitting(lambda n: True, 4, 1000) == 1000


def test_largest_model_search_is_refused_without_a_gpu(monkeypatch):
    import torch

    from tools.bench_offload import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU machine, also on a GPU one
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        main(["--config", "tiny_moe", "--largest"])
