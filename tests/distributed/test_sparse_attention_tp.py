"""TP=2 (two real gloo processes) equals one process for sparse all-attention: a whole model through
``parallelize`` (the trainer's path) and the attention core over each rank's heads and memory slice."""
import copy

import torch

from support.equivalence import parallel_vs_reference
from support.distributed import run_distributed

BASE = ["--model.d_model=32", "--model.n_layers=2", "--model.n_heads=4", "--model.n_kv_heads=2",
        "--model.vocab_size=64", "--model.max_seq_len=32", "--data.seq_len=32", "--train.global_batch_size=2",
        "--model.pattern=allattn,dense", "--attention.persistent_slots=6"]
MODEL_CASES = {
    "bigbird": ["--attention.pattern=bigbird", "--attention.block=8", "--attention.random_blocks=1"],
    "sliding_window": ["--attention.pattern=sliding_window", "--attention.window=8"],
}
CORE_PATTERNS = ["bigbird", "sliding_window", "causal"]



def _model_case(overrides):
    from sparselm.config import load_config
    from sparselm.model.sparse_attention import SparseAttention
    from sparselm.parallel.pieces import is_sharded_over
    from sparselm.parallel.tensor import ColumnLinear

    cfg1 = load_config(None, BASE + overrides)
    cfg2 = load_config(None, BASE + overrides + ["--parallel.tp=2"])
    ids = torch.randint(0, 64, (2, 32), generator=torch.Generator().manual_seed(3))

    def check(model, topo):
        attn = model.layers[0].attn
        assert isinstance(attn, SparseAttention) and isinstance(attn.k_proj, ColumnLinear)
        assert attn.memory_k.shape == (1, 6, 8) and is_sharded_over(attn.memory_k, "tp") and is_sharded_over(attn.memory_v, "tp")
        assert isinstance(model.layers[1].attn, SparseAttention) and model.layers[1].attn.memory_k is None

    return parallel_vs_reference(cfg1, cfg2, ids, ids, check=check)


def _core_case(rank, world, group, pattern):
    """Each rank's heads of the attention core, with its memory slice, equal those heads unsharded (fp64)."""
    from sparselm.config import ModelConfig
    from sparselm.model.sparse_attention import AttentionConfig, SparseAttention
    from sparselm.parallel.pieces import Shard, shard_

    mcfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=96)
    torch.manual_seed(0)  # identical layer, inputs and upstream gradient on every rank
    full = SparseAttention(mcfg, AttentionConfig(pattern=pattern, window=24, block=16, random_blocks=1), 7).double()
    with torch.no_grad():
        q, k, v = full.heads(torch.randn(2, 96, 64, dtype=torch.float64))
    dy = torch.randn_like(q)
    sharded = copy.deepcopy(full)

    for p in (sharded.memory_k, sharded.memory_v):
        shard_(p, Shard(0, "tp"), {"tp": group})
    qkv = [t.clone().requires_grad_() for t in (q, k, v)]
    out = full.attend(*qkv)
    (out * dy).sum().backward()
    hq, hkv = 4 // world, 2 // world
    heads = [slice(rank * hq, (rank + 1) * hq), slice(rank * hkv, (rank + 1) * hkv), slice(rank * hkv, (rank + 1) * hkv)]
    local = [t.detach()[:, s].clone().requires_grad_() for t, s in zip(qkv, heads)]
    out_local = sharded.attend(*local)
    (out_local * dy[:, heads[0]]).sum().backward()

    parts = [torch.empty_like(out_local) for _ in range(world)]
    torch.distributed.all_gather(parts, out_local.detach().contiguous(), group=group)
    torch.testing.assert_close(torch.cat(parts, dim=1), out.detach(), rtol=1e-12, atol=1e-12, msg=pattern)
    for t_local, t_full, s in zip(local, qkv, heads):
        torch.testing.assert_close(t_local.grad, t_full.grad[:, s], rtol=1e-10, atol=1e-12)
    for name in ("memory_k", "memory_v"):
        g_local = getattr(sharded, name).grad
        assert g_local.abs().sum() > 0, name
        torch.testing.assert_close(g_local, getattr(full, name).grad[heads[1]], rtol=1e-10, atol=1e-12, msg=name)


def _all(rank, world):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    for pattern in CORE_PATTERNS:
        _core_case(rank, world, group, pattern)
    return {name: _model_case(over) for name, over in MODEL_CASES.items()}


def test_tp2_equals_one_process():
    results = run_distributed(_all, 2)
    for rank_errors in results:
        for case, errors in rank_errors.items():
            bad = {k: e for k, e in errors.items() if not e < 1e-5}
            assert not bad, f"{case}: {bad}"
            assert any(k.endswith("memory_k") for k in errors) and any(k.endswith("memory_v") for k in errors)
