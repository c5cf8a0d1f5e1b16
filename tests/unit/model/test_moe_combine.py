"""The MoE combine (sparselm.model.moe.dispatch.combine_choices) against the one it replaced (gate product
in fp32, an fp32 [tokens * k, d_model] buffer of slots, summed over k): values and gradients equal in fp32,
close in bf16, with and without dropped assignments; bit-identical on repeat.  GPU only (skipped without
CUDA): a dropless MoE forward makes no host synchronisation (torch.cuda.set_sync_debug_mode)."""
import pytest
import torch

from sparselm.model.moe.dispatch import combine_choices, count_ids


def old_combine(out, gates, order):
    n, k = gates.shape
    weighted = out.float() * gates.reshape(-1).index_select(0, order).unsqueeze(1)
    slots = weighted.new_zeros(n * k, out.shape[1]).index_copy(0, order, weighted)
    return slots.view(n, k, -1).sum(1).to(out.dtype)


def _case(dtype, n=23, k=3, d=16, drop=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randperm(n * k, generator=g)
    order = ids[: int(n * k * (1 - drop))]  # kept assignments in an expert-grouped (here: random) order
    out = torch.randn(order.numel(), d, generator=g).to(dtype)
    gates = torch.softmax(torch.randn(n, k, generator=g), -1)  # fp32, as the router gives them
    return out, gates, order


def _run(fn, out, gates, order):
    o, g = out.clone().requires_grad_(), gates.clone().requires_grad_()
    y = fn(o, g, order)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(y.dtype)
    y.backward(dy)
    return y.detach(), o.grad, g.grad


@pytest.mark.parametrize("drop", [0.0, 0.3, 1.0], ids=["dropless", "drops", "all_dropped"])
def test_combine_equals_the_old_one_in_fp32(drop):
    case = _case(torch.float32, drop=drop)
    new, old = _run(combine_choices, *case), _run(old_combine, *case)
    for a, b, name in zip(new, old, ("output", "expert-output grad", "gates grad")):
        assert a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    again = _run(combine_choices, *case)
    assert all(torch.equal(a, b) for a, b in zip(new, again))  # deterministic


def test_combine_in_bf16_is_close_to_the_old_one():
    case = _case(torch.bfloat16)
    new, old = _run(combine_choices, *case), _run(old_combine, *case)
    assert new[0].dtype == torch.bfloat16 and new[1].dtype == torch.bfloat16 and new[2].dtype == torch.float32
    for a, b, name in zip(new, old, ("output", "expert-output grad", "gates grad")):
        # both accumulate in fp32 and round the output once: they differ by at most one bf16 rounding
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-2, atol=1e-2, msg=name)


def test_count_ids_equals_bincount():
    ids = torch.randint(0, 7, (100,))
    assert torch.equal(count_ids(ids, 9), torch.bincount(ids, minlength=9))


@pytest.mark.gpu(reason="needs a CUDA GPU (host synchronisation is a GPU matter)")
def test_moe_forward_makes_no_host_sync_on_cuda():
    from sparselm.model.moe import MoELayer

    layer = MoELayer(256, 8, 2, 512, num_shared_experts=1)
    for module in layer.modules():  # a layer built alone is not initialised (the model's init does that)
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    layer = layer.cuda().bfloat16().train()
    x = torch.randn(4, 128, 256, device="cuda", dtype=torch.bfloat16)
    layer(x)  # first call: lazy initialisation (cached index tensors, cuBLAS handles) may synchronise
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        y, aux = layer(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    (y.float().square().mean() + aux).backward()
    assert torch.isfinite(y).all()
