"""Context parallelism (parallel.cp: ulysses and allgather) against one process, real gloo: the attention core
alone in float64 for every pattern (with and without memory slots, MHA and GQA); and for every block kind the loss,
the logits, every gradient (reduced over the data x context ranks as DeepSpeed reduces them) and the layer
metrics of cp2 equal the one-process model's (recomputation included); cp2 with tp2 and with dp2, and cp4
with key/value heads fewer than cp.  One 2-process world and one 4-process world for the whole module."""
import pytest
import torch

from support.distributed import run_distributed
from support.equivalence import parallel_vs_reference

BASE = ["--model.vocab_size=64", "--model.d_model=32", "--model.n_layers=2",
        "--model.n_heads=4", "--model.n_kv_heads=2", "--model.max_seq_len=32", "--data.seq_len=32",
        "--train.global_batch_size=2", "--model.loss_chunk_tokens=24"]  # chunks cross the pieces' boundary
CASES = {
    "dense": [],
    "dense_sinks_sliding_layers": ["--model.attention_sinks=true", "--model.o_bias=true", "--model.n_kv_heads=2",
                                   "--model.attention_layers=sliding,full", "--model.sliding_window=6"],
    "dense_kv1_sliding_layers": ["--model.n_kv_heads=1", "--model.attention_layers=sliding,full",
                                 "--model.sliding_window=6", "--model.qk_norm=per_head"],
    "moe": ["--model.pattern=moe,dense", "--moe.num_experts=4", "--moe.top_k=2", "--moe.num_shared_experts=1",
            "--moe.bias_balancing=true", "--moe.aux_loss_coef=0.1", "--moe.z_loss_coef=0.01"],
    "moe_recompute_full": ["--model.pattern=moe", "--moe.num_experts=4", "--moe.top_k=2", "--parallel.recompute=full"],
    "allattn_recompute_selective": ["--model.pattern=allattn,dense", "--attention.persistent_slots=4",
                                    "--parallel.recompute=selective"],
    "moe_micro_batch_scope": ["--model.pattern=moe", "--moe.num_experts=4", "--moe.top_k=1",
                              "--moe.balance_scope=micro_batch", "--moe.aux_loss_coef=0.1"],
    "pkm": ["--model.pattern=pkm_ffn,pkm", "--pkm.n_keys=256", "--pkm.heads=2", "--pkm.knn=4", "--pkm.k_dim=16"],
    "allattn_bigbird_memory": ["--model.pattern=allattn,dense", "--attention.persistent_slots=6",
                               "--attention.pattern=bigbird", "--attention.block=4", "--attention.random_blocks=1",
                               "--attention.backend=block_sparse"],
    "allattn_window_memory_kv1": ["--model.pattern=allattn", "--model.n_kv_heads=1", "--attention.persistent_slots=5",
                                  "--attention.pattern=sliding_window", "--attention.window=12"],
}
ALLGATHER = ["--parallel.cp_method=allgather"]
ALLGATHER_CASES = {  # every rank keeps its zigzag queries, gathers keys and values: patterns at global positions
    "allgather_dense_sliding_layers": ["--model.n_kv_heads=1", "--model.attention_layers=sliding,full",
                                       "--model.sliding_window=6"],
    "allgather_moe": CASES["moe"],
    "allgather_bigbird_memory": CASES["allattn_bigbird_memory"],
    "allgather_window_memory_kv1": CASES["allattn_window_memory_kv1"],
    "allgather_strided_memory": ["--model.pattern=allattn,dense", "--attention.persistent_slots=3",
                                 "--attention.pattern=strided", "--attention.stride=5"],
}


def _reduce_like_engine(model, topo, ref):
    """Average every gradient over the data x context ranks (what DeepSpeed does with the mpu's data group);
    return the layer metrics' errors against the one-process model (their mean over the ranks)."""
    import torch.distributed as dist

    from support.run import rel_error

    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=topo.dp_cp_group)
            p.grad /= topo.dp_cp_size
    errors = {}
    for name, value in model.metrics().items():
        mean = value.clone()
        dist.all_reduce(mean, group=topo.dp_cp_group)
        errors[f"metric:{name}"] = rel_error(mean / topo.dp_cp_size, ref.metrics()[name])
    return errors


def _case(extra, layout):
    from sparselm.config import load_config
    from sparselm.parallel.context import UlyssesAttention
    from sparselm.parallel.context_allgather import AllGatherAttention

    cfg1 = load_config("tiny_dense", BASE + extra)
    cfg2 = load_config("tiny_dense", BASE + extra + layout)
    g = torch.Generator().manual_seed(5)
    ids, labels = torch.randint(0, 64, (2, 32), generator=g), torch.randint(0, 64, (2, 32), generator=g)
    labels[0, 10:20] = -100  # ignored labels weigh the pieces unequally: the loss is the global token mean

    def check(model, topo):
        method = AllGatherAttention if "--parallel.cp_method=allgather" in layout else UlyssesAttention
        assert all(isinstance(block.attn, method) for block in model.layers)

    errors = parallel_vs_reference(cfg1, cfg2, ids, labels, check=check, after_backward=_reduce_like_engine)
    if "--model.pattern=moe" in " ".join(extra):
        assert any(k.startswith("metric:") for k in errors), "no layer metrics compared"
    return errors


CORE_PATTERNS = {"causal": "reference", "sliding_window": "block_sparse", "strided": "reference",
                 "fixed": "block_sparse", "block_local": "reference", "bigbird": "block_sparse"}


def _core_cases(rank, world):
    """The attention core alone in float64: each rank's piece of the output and of the q, k, v gradients, and
    the memory gradients summed over the ranks, equal the whole sequence's (every pattern, both methods,
    MHA with memory slots and GQA with one kv head without)."""
    import copy

    import torch.distributed as dist

    from sparselm.config import ModelConfig
    from sparselm.model.sparse_attention import AttentionConfig, SparseAttention
    from sparselm.parallel.context import UlyssesAttention, piece_positions, swap_class
    from sparselm.parallel.context_allgather import AllGatherAttention

    group = dist.new_group(list(range(world)))
    for i, (pattern, backend) in enumerate(CORE_PATTERNS.items()):
        for j, (method, mixin) in enumerate((("ulysses", UlyssesAttention), ("allgather", AllGatherAttention))):
            # (kv heads, memory slots): MHA with memory and GQA with one kv head; causal and sliding_window take
            # both with each method, the other patterns one per method (both over the two methods)
            combos = ((4, 5), (1, 0)) if i < 2 else (((4, 5), (1, 0))[(i + j) % 2],)
            for kv, slots in combos:
                mcfg = ModelConfig(d_model=32, n_heads=4, n_kv_heads=kv, max_seq_len=64)
                acfg = AttentionConfig(pattern=pattern, window=10, stride=6, summary=2, block=8, random_blocks=1,
                                       backend=backend)
                torch.manual_seed(0)  # the same layer, inputs and upstream gradient on every rank
                full = SparseAttention(mcfg, acfg, slots).double()
                with torch.no_grad():
                    qkv = [t.clone().requires_grad_() for t in full.heads(torch.randn(2, 64, 32, dtype=torch.float64))]
                dy = torch.randn(2, 4, 64, 8, dtype=torch.float64)
                (full.attend(*qkv) * dy).sum().backward()
                piece = copy.deepcopy(full)
                piece.zero_grad()
                swap_class(piece, mixin)
                piece.cp_group, piece.cp_size, piece.cp_rank = group, world, rank
                pos = piece_positions(64, world, rank, method == "allgather")
                local = [t.detach()[:, :, pos].clone().requires_grad_() for t in qkv]
                out = piece.attend(*local)
                (out * dy[:, :, pos]).sum().backward()
                where = f"{pattern} {method} kv{kv} slots{slots}"
                with torch.no_grad():
                    expected = full.attend(*[t.detach() for t in qkv])[:, :, pos]
                torch.testing.assert_close(out.detach(), expected, rtol=1e-10, atol=1e-12, msg=where)
                for t_local, t_full in zip(local, qkv):
                    torch.testing.assert_close(t_local.grad, t_full.grad[:, :, pos], rtol=1e-10, atol=1e-12, msg=where)
                for name in ("memory_k", "memory_v") if slots else ():
                    grad = getattr(piece, name).grad.clone()
                    dist.all_reduce(grad, group=group)
                    torch.testing.assert_close(grad, getattr(full, name).grad, rtol=1e-10, atol=1e-12, msg=where)


def _world2(rank, world):
    _core_cases(rank, world)
    out = {name: _case(extra, ["--parallel.cp=2"]) for name, extra in CASES.items()}
    return {**out, **{name: _case(extra, ["--parallel.cp=2", *ALLGATHER]) for name, extra in ALLGATHER_CASES.items()}}


def _world4(rank, world):
    return {
        "cp2_tp2": _case(["--model.pattern=allattn,dense", "--attention.persistent_slots=6"],
                         ["--parallel.cp=2", "--parallel.tp=2"]),
        "cp2_dp2_moe": _case(CASES["moe"], ["--parallel.cp=2"]),
        "cp4_kv2": _case([], ["--parallel.cp=4"]),
        "cp4_allgather_fixed_memory": _case(["--model.pattern=allattn,dense", "--attention.persistent_slots=3",
                                             "--attention.pattern=fixed", "--attention.stride=8",
                                             "--attention.summary=2"], ["--parallel.cp=4", *ALLGATHER]),
        "cp2_allgather_tp2": _case(["--model.pattern=allattn,dense", "--attention.persistent_slots=6",
                                    "--attention.pattern=block_local", "--attention.block=8"],
                                   ["--parallel.cp=2", "--parallel.tp=2", *ALLGATHER]),
    }


def _assert_close(results):
    for rank_errors in results:
        for case, errors in rank_errors.items():
            bad = {k: e for k, e in errors.items() if not e < 1e-5}
            assert not bad, f"{case}: {bad}"
            assert any(k.startswith("grad:") for k in errors)


def test_cp2_equals_one_process_for_every_block_kind():
    _assert_close(run_distributed(_world2, 2))


def test_cp2_with_tp2_dp2_and_cp4_equal_one_process():
    _assert_close(run_distributed(_world4, 4))


def test_config_errors_name_the_fix():
    from sparselm.config import ConfigError, load_config
    from sparselm.parallel.layout import validate_layout

    cases = [
        (["--parallel.cp=3", "--model.n_heads=6", "--model.n_kv_heads=2", "--model.d_model=48"], "one must divide the other"),
        (["--parallel.cp=8"], "does not divide the 4 query heads"),
        (["--parallel.cp=2", "--data.seq_len=31"], "not divisible by 2 \\(parallel.cp=2"),
        (["--parallel.cp=4", "--parallel.cp_method=allgather", "--data.seq_len=28"], "not divisible by 8"),
        (["--parallel.cp=2", "--model.pattern=moe", "--moe.noisy_gating=true"], "moe.noisy_gating"),
        (["--parallel.cp=2", "--model.mtp_layers=1"], "model.mtp_layers=1 with parallel.cp > 1"),
        (["--parallel.cp=2", "--model.attention=mla", "--model.n_kv_heads=0", "--model.kv_lora_rank=16",
          "--model.qk_rope_head_dim=8", "--model.qk_nope_head_dim=8", "--model.v_head_dim=16"],
         "model.attention=mla with parallel.cp > 1"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError, match=message):
            load_config("tiny_dense", BASE + extra)
    cfg = load_config("tiny_dense", BASE + ["--parallel.cp=2"])
    with pytest.raises(ConfigError, match="tp \\* parallel.pp \\* parallel.cp = 2"):
        validate_layout(cfg, 3)


@pytest.mark.parametrize("tp,cp,dp,pp", [(2, 2, 2, 1), (1, 4, 2, 1), (2, 2, 1, 2), (1, 2, 3, 2)])
def test_layout_with_cp_matches_megatron_and_deepspeed(tp, cp, dp, pp):
    from deepspeed.runtime.pipe.topology import PipeModelDataParallelTopology
    from deepspeed.utils.groups import _get_expert_parallel_ranks
    from megatron.core.parallel_state import RankGenerator

    from sparselm.parallel.layout import Layout

    layout = Layout(tp=tp, pp=pp, dp=dp, cp=cp, ep=2 if dp * cp % 2 == 0 else 1)
    gen = RankGenerator(tp=tp, ep=1, dp=dp, pp=pp, cp=cp, order="tp-cp-ep-dp-pp")
    mine = lambda axis: sorted(sorted(g) for g in layout.groups(axis))  # noqa: E731
    for axis, token in (("tp", "tp"), ("cp", "cp"), ("dp", "dp"), ("dpcp", "cp-dp"), ("pp", "pp"), ("mp", "tp-pp")):
        assert mine(axis) == sorted(sorted(g) for g in gen.get_ranks(token)), axis
    ds = PipeModelDataParallelTopology(num_pp=pp, num_mp=tp, num_dp=dp * cp)
    for rank in range(layout.world_size):
        c, mine_c = ds.get_coord(rank), layout.coord(rank)
        assert (c.pipe, c.model, c.data) == (mine_c.pp, mine_c.tp, layout.data_index(rank))
        assert layout.rank(*mine_c) == rank
    ep, edp = _get_expert_parallel_ranks(layout.world_size, tp, layout.ep, pp)
    assert mine("ep") == sorted(sorted(g) for g in ep) and mine("edp") == sorted(sorted(g) for g in edp)
