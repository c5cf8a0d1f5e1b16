"""Tensor-parallel PKM (value table sharded along its width) equals the unsharded layer: real gloo, 2 ranks."""
import copy

import torch

from pkm_reference import pkm_cfg
from sparselm.distributed_testing import run_distributed

VARIANTS = {
    "plain": [],  # columns all-gathered
    "gated": ["--pkm.gated=true"],  # column-parallel gate, row-parallel output projection
    "projected": ["--pkm.v_dim=48"],  # row-parallel output projection
}


def _check(rank, world, extras_by_name):
    import torch.distributed as dist

    from sparselm.model.pkm import ProductKeyMemory
    from sparselm.parallel.pkm import shard_pkm

    group = dist.new_group(list(range(world)))
    for name, extra in extras_by_name.items():
        cfg = pkm_cfg(*extra)
        torch.manual_seed(0)  # identical full layers, inputs and upstream gradients on every rank
        full = [ProductKeyMemory(32, cfg.pkm, shared_from=None).double() for _ in range(2)]
        # Layer 1 shares layer 0's table: the shared Parameter must be sliced once and reduced right.
        full[1].shared_from = 0
        full[1].values = full[0].values
        x = torch.randn(2, 6, 32, dtype=torch.float64)
        dy = torch.randn(2, 6, 32, dtype=torch.float64)
        sharded = copy.deepcopy(full)
        assert sharded[1].values is sharded[0].values
        for module in sharded:
            shard_pkm(module, group)
        width = full[0].v_dim // world
        assert sharded[0].values.shape == (256, width) and sharded[1].values is sharded[0].values

        outs = []
        for layers in (full, sharded):
            xi = x.clone().requires_grad_()
            y = layers[1](layers[0](xi))
            (y * dy).sum().backward()
            outs.append((y.detach(), xi.grad))
        torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(outs[1][1], outs[0][1], rtol=1e-10, atol=1e-12, msg=name)
        for layer_full, layer_tp in zip(full, sharded):
            ref = dict(layer_full.named_parameters())
            for pname, p in layer_tp.named_parameters():
                g = ref[pname].grad
                dim = getattr(p, "partition_dim", None) if getattr(p, "tensor_model_parallel", False) else None
                if dim is not None:
                    g = g.narrow(dim, rank * p.shape[dim], p.shape[dim])
                assert p.grad is not None and g.abs().sum() > 0, (name, pname)
                torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12, msg=f"{name} {pname}")
        assert torch.equal(sharded[0].usage.last_read, full[0].usage.last_read)  # same slots on every rank
    return True


def test_tp2_sharded_output_and_gradients_equal_unsharded():
    assert run_distributed(_check, 2, VARIANTS) == [True, True]
