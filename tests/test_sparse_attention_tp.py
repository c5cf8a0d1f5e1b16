"""Heads split across a real 2-rank gloo group: each rank's attention core over its heads (with its
slice of the persistent memory) equals those heads of the unsharded layer, forward and backward."""
import copy

import torch

from sparselm.distributed_testing import run_distributed

PATTERNS = ["bigbird", "sliding_window", "causal"]


def _check(rank, world, patterns):
    import torch.distributed as dist

    from sparselm.config import ModelConfig
    from sparselm.model.sparse_attention import AttentionConfig, SparseAttention
    from sparselm.parallel.allattn import shard_persistent_memory

    group = dist.new_group(list(range(world)))
    mcfg = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=96)
    for pattern in patterns:
        torch.manual_seed(0)  # identical layer, inputs and upstream gradient on every rank
        acfg = AttentionConfig(pattern=pattern, window=24, block=16, random_blocks=1)
        full = SparseAttention(mcfg, acfg, memory_slots=7).double()
        x = torch.randn(2, 96, 64, dtype=torch.float64)
        with torch.no_grad():
            q, k, v = full.heads(x)
        dy = torch.randn_like(q)
        sharded = shard_persistent_memory(copy.deepcopy(full), group)
        assert sharded.memory_k.shape == (2 // world, 7, 16) and sharded.memory_k.tensor_model_parallel

        qkv = [t.clone().requires_grad_() for t in (q, k, v)]
        out = full.attend(*qkv)
        (out * dy).sum().backward()

        hq, hkv = 4 // world, 2 // world  # contiguous head blocks, as column-parallel projections give
        local = [qkv[0].detach()[:, rank * hq:(rank + 1) * hq], *(t.detach()[:, rank * hkv:(rank + 1) * hkv] for t in qkv[1:])]
        local = [t.clone().requires_grad_() for t in local]
        out_local = sharded.attend(*local)
        (out_local * dy[:, rank * hq:(rank + 1) * hq]).sum().backward()

        parts = [torch.empty_like(out_local) for _ in range(world)]
        dist.all_gather(parts, out_local.detach().contiguous(), group=group)
        torch.testing.assert_close(torch.cat(parts, dim=1), out.detach(), rtol=1e-12, atol=1e-12, msg=pattern)
        torch.testing.assert_close(local[0].grad, qkv[0].grad[:, rank * hq:(rank + 1) * hq], rtol=1e-10, atol=1e-12)
        for t_local, t_full in zip(local[1:], qkv[1:]):
            torch.testing.assert_close(t_local.grad, t_full.grad[:, rank * hkv:(rank + 1) * hkv], rtol=1e-10, atol=1e-12)
        for name in ("memory_k", "memory_v"):
            g_full, g_local = getattr(full, name).grad, getattr(sharded, name).grad
            assert g_local.abs().sum() > 0, name
            torch.testing.assert_close(g_local, g_full[rank * hkv:(rank + 1) * hkv], rtol=1e-10, atol=1e-12, msg=name)
    return True


def test_tp2_heads_and_memory_shards_equal_unsharded():
    assert run_distributed(_check, 2, PATTERNS) == [True, True]
