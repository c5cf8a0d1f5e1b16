"""Layout arithmetic against megatron-core's and DeepSpeed's own rank maps (no process group), layout
validation messages, and one 8-process gloo run building real groups for three layouts."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from sparselm.config import ConfigError, load_config
from support.distributed import run_distributed
from sparselm.parallel.layout import Layout, validate_layout

LAYOUTS = [Layout(tp, pp, dp, ep) for tp in (1, 2, 4) for pp in (1, 2, 3) for dp in (1, 2, 4)
           for ep in (1, 2, 4) if dp % ep == 0]


def _sorted(groups):
    return sorted(sorted(g) for g in groups)


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_coordinates_match_deepspeed_topology(layout):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology

    ds = PipeModelDataParallelTopology(num_pp=layout.pp, num_mp=layout.tp, num_dp=layout.dp)
    assert ds.world_size() == layout.world_size
    for rank in range(layout.world_size):
        c = ds.get_coord(rank)
        assert (c.pipe, c.data, c.model) == tuple(layout.coord(rank))[:3]  # cp = 0: one context-parallel rank
        assert layout.rank(*layout.coord(rank)) == rank
    for axis, ds_axis in (("tp", "model"), ("dp", "data"), ("pp", "pipe")):
        assert _sorted(layout.groups(axis)) == _sorted(ds.get_axis_comm_lists(ds_axis))


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_groups_match_megatron_rank_generator(layout):
    from megatron.core.parallel_state import RankGenerator

    gen = RankGenerator(tp=layout.tp, ep=1, dp=layout.dp, pp=layout.pp, cp=1, order="tp-cp-ep-dp-pp")
    for axis, token in (("tp", "tp"), ("dp", "dp"), ("pp", "pp"), ("mp", "tp-pp")):
        assert _sorted(layout.groups(axis)) == _sorted(gen.get_ranks(token)), axis


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_expert_groups_match_deepspeed(layout):
    from deepspeed.utils.groups import _get_expert_parallel_ranks

    ep, edp = _get_expert_parallel_ranks(layout.world_size, layout.tp, layout.ep, layout.pp)
    assert _sorted(layout.groups("ep")) == _sorted(ep)
    assert _sorted(layout.groups("edp")) == _sorted(edp)


def test_rank_order_is_tp_fastest_then_dp_then_pp():
    layout = Layout(tp=2, pp=2, dp=2, ep=2)
    assert layout.groups("tp") == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups("dp") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("pp") == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert layout.groups("ep") == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups("edp") == [[r] for r in range(8)]
    assert Layout(tp=1, pp=1, dp=8, ep=4).groups("edp") == [[0, 4], [1, 5], [2, 6], [3, 7]]


BASE = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=4", "--model.vocab_size=64",
        "--model.d_ff=64", "--train.global_batch_size=8"]


def _cfg(**parallel):
    """A valid config, then the layout set directly (load_config would reject some on its own)."""
    cfg = load_config(None, BASE + ["--parallel.timeout_minutes=3"])
    for key, value in parallel.items():
        setattr(cfg.parallel, key, value)
    return cfg


@pytest.mark.parametrize("parallel, world, words", [
    (dict(tp=2, pp=2), 6, ["world size 6", "parallel.tp * parallel.pp = 4"]),
    (dict(tp=2, ep=4), 4, ["parallel.ep=4", "data-parallel size 2"]),
    (dict(pp=4), 4, ["model.n_layers=2", "parallel.pp=4"]),
    (dict(tp=8), 8, ["parallel.tp=8", "model.n_heads=4"]),
    (dict(tp=3), 3, ["parallel.tp=3", "model.n_heads=4"]),
])
def test_impossible_layouts_name_the_constraint(parallel, world, words):
    with pytest.raises(ConfigError) as err:
        validate_layout(_cfg(**parallel), world)
    for w in words:
        assert w in str(err.value)


def test_vocab_and_ffn_width_must_split_over_tp():
    cfg = _cfg(tp=2)
    cfg.model.vocab_size = 65
    with pytest.raises(ConfigError, match=r"model.vocab_size=65 is not divisible by parallel.tp=2"):
        validate_layout(cfg, 2)
    cfg = _cfg(tp=4)
    cfg.model.d_ff = 66
    with pytest.raises(ConfigError, match=r"feed-forward width 66 \(model.d_ff\) is not divisible by parallel.tp=4"):
        validate_layout(cfg, 4)
    assert validate_layout(_cfg(tp=2, pp=2, ep=2), 8) == Layout(tp=2, pp=2, dp=2, ep=2)


# ------------------------------------------------------------------------------- live groups
def _describe(topo):
    import torch.distributed as dist

    groups = {"tp": topo.tp_group, "dp": topo.dp_group, "pp": topo.pp_group, "ep": topo.ep_group,
              "edp": topo.expert_dp_group}
    out = {"coord": tuple(topo.coord), "groups": {k: dist.get_process_group_ranks(g) for k, g in groups.items()},
           "first": topo.is_first_stage, "last": topo.is_last_stage, "mpu": None}
    if topo.mpu is not None:
        m = topo.mpu
        out["mpu"] = {"tp": (m.get_tensor_model_parallel_rank(), m.get_tensor_model_parallel_world_size()),
                      "mp": (m.get_model_parallel_rank(), m.get_model_parallel_world_size()),
                      "dp": (m.get_data_parallel_rank(), m.get_data_parallel_world_size()),
                      "dp_ranks": list(m.get_data_parallel_group_ranks()),
                      "mp_ranks": dist.get_process_group_ranks(m.get_model_parallel_group())}
    return out


def _timeout_s(group) -> float:
    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _group_timeouts(topo) -> dict[str, float]:
    """Every group a run creates, with its timeout in seconds: megatron-core's, DeepSpeed's expert groups and one
    created later as the checkpoint writer and the pipeline's tied weights create theirs."""
    return {"tp": _timeout_s(topo.tp_group), "dp": _timeout_s(topo.dp_group), "pp": _timeout_s(topo.pp_group),
            "ep": _timeout_s(topo.ep_group), "edp": _timeout_s(topo.expert_dp_group),
            "later": _timeout_s(dist.new_group(backend="gloo"))}


def _build_three_layouts(rank, world):
    from deepspeed.utils import groups as ds_groups

    import sparselm.parallel.topology as topology
    from sparselm.parallel.layout import Layout
    from sparselm.training.runtime import set_group_timeout

    set_group_timeout(3)  # as init_distributed does with parallel.timeout_minutes
    results = {}
    for name, parallel in {"tp2pp2dp2ep2": dict(tp=2, pp=2, ep=2), "tp2dp4ep2": dict(tp=2, ep=2),
                           "dp8ep4": dict(ep=4)}.items():
        topo = topology.Topology(_cfg(**parallel))
        results[name] = _describe(topo)
        if name == "tp2pp2dp2ep2":
            results["timeouts"] = _group_timeouts(topo)
        # what an MoE layer looks up by DeepSpeed's name is this layout's expert group
        assert ds_groups._get_expert_parallel_group(f"ep_size_{topo.ep}") is topo.ep_group
        assert ds_groups.expert_tensor_parallel_world_size == 1
        topo.teardown()

    class PipelineFastest(Layout):  # a wrong rank order: the start-up check must catch it on every rank
        def coord(self, r):
            c = super().coord(r)
            return type(c)(pp=r % self.pp, dp=c.dp, tp=(r // self.pp) % self.tp)

    original = topology.validate_layout
    topology.validate_layout = lambda cfg, ws: PipelineFastest(**original(cfg, ws).__dict__)
    try:
        topology.Topology(_cfg(tp=2, pp=2))
        results["mismatch"] = "not detected"
    except RuntimeError as err:
        results["mismatch"] = str(err)
    finally:
        topology.validate_layout = original
    return results


def test_topology_builds_agreeing_groups_on_8_ranks():
    per_rank = run_distributed(_build_three_layouts, 8)
    expected_layouts = {"tp2pp2dp2ep2": Layout(2, 2, 2, 2), "tp2dp4ep2": Layout(2, 1, 4, 2), "dp8ep4": Layout(1, 1, 8, 4)}
    for rank, results in enumerate(per_rank):
        for name, layout in expected_layouts.items():
            got = results[name]
            assert got["coord"] == tuple(layout.coord(rank))
            for axis, ranks in got["groups"].items():
                assert ranks == layout.group(axis, rank), (name, rank, axis)
            assert got["first"] == (layout.coord(rank).pp == 0) and got["last"] == (layout.coord(rank).pp == layout.pp - 1)
            if layout.pp > 1:
                assert got["mpu"] is None  # DeepSpeed's pipeline engine takes the topology from the module
            else:
                c = layout.coord(rank)
                assert got["mpu"] == {"tp": (c.tp, layout.tp), "mp": (c.tp, layout.tp), "dp": (c.dp, layout.dp),
                                      "dp_ranks": layout.group("dp", rank), "mp_ranks": layout.group("tp", rank)}
        assert "parallel layouts disagree" in results["mismatch"], results["mismatch"]
        # parallel.timeout_minutes bounds every group, not only the default one (megatron's and torch's own
        # defaults are 30 minutes: a hung node would stall the survivors that long)
        assert results["timeouts"] == dict.fromkeys(("tp", "dp", "pp", "ep", "edp", "later"), 180.0), results["timeouts"]
    # spot checks written from the rank order (TP fastest, then DP, then PP), not from the code
    assert per_rank[5]["tp2pp2dp2ep2"]["groups"] == {"tp": [4, 5], "dp": [5, 7], "pp": [1, 5], "ep": [5, 7], "edp": [5]}
    assert per_rank[6]["dp8ep4"]["groups"]["edp"] == [2, 6]
