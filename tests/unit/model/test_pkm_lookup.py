"""PKM numerics: product-key top-k is exact, the layer equals a dense reference, causality."""
import pytest
import torch

from support.pkm_reference import dense_memory, full_keys, pkm_cfg
from sparselm.model.pkm import ProductKeyMemory, product_key_topk


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed, n_sub, knn", [(0, 16, 8), (1, 32, 32), (2, 24, 1), (3, 64, 16), (4, 7, 5)])
def test_product_topk_equals_brute_force_over_all_keys(seed, n_sub, knn, dtype):
    g = torch.Generator().manual_seed(seed)
    heads, half, n = 3, 6, 50
    q = torch.randn(n, heads, 2 * half, generator=g, dtype=dtype)
    keys = torch.randn(heads, 2, n_sub, half, generator=g, dtype=dtype)
    scores, slots = product_key_topk(q, keys, knn)
    # Brute force: score every one of the n_sub**2 full keys.
    ref_scores, ref_slots = torch.einsum("nhd,hkd->nhk", q, full_keys(keys)).topk(knn, dim=-1)
    assert torch.equal(slots, ref_slots)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(scores, ref_scores, rtol=tol, atol=tol)


@pytest.mark.parametrize("extra", [[], ["--pkm.gated=true"], ["--pkm.v_dim=24"], ["--pkm.query_norm=none"]])
def test_layer_output_and_gradients_equal_dense_reference(extra):
    torch.manual_seed(0)
    cfg = pkm_cfg(*extra)
    fast = ProductKeyMemory(cfg.model.d_model, cfg.pkm).double()
    dense = ProductKeyMemory(cfg.model.d_model, cfg.pkm).double()
    dense.load_state_dict(fast.state_dict())
    x = torch.randn(3, 10, cfg.model.d_model, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = fast(xa), dense_memory(dense, xb)
    assert ya.shape == x.shape
    torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(ya)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    grads_b = dict(dense.named_parameters())
    for name, p in fast.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, grads_b[name].grad, rtol=1e-10, atol=1e-12, msg=name)
    assert fast.values.grad.layout == torch.strided  # dense gradients: safe under data parallel and ZeRO


def _future_change_moves_past(module):
    torch.manual_seed(1)
    x = torch.randn(2, 12, 32)
    y = x.clone()
    y[:, 7:] += torch.randn(2, 5, 32)
    a, b = module(x), module(y)
    assert not torch.allclose(a[:, 7:], b[:, 7:])  # the change is visible where it happens
    return not torch.equal(a[:, :7], b[:, :7])


def test_default_query_norm_is_causal_in_training_mode():
    cfg = pkm_cfg()
    assert cfg.pkm.query_norm == "layernorm"
    assert not _future_change_moves_past(ProductKeyMemory(32, cfg.pkm).train())


def test_batchnorm_queries_leak_the_future_in_training_mode():
    """Why batchnorm is documented as non-causal: its batch statistics include later positions."""
    assert _future_change_moves_past(ProductKeyMemory(32, pkm_cfg("--pkm.query_norm=batchnorm").pkm).train())


def test_pkm_language_model_is_causal():
    from sparselm.model import build_model

    model = build_model(pkm_cfg("--model.pattern=pkm,pkm_ffn"))
    x = torch.randint(0, 128, (2, 20))
    y = x.clone()
    y[:, 9] = (y[:, 9] + 1) % 128
    a, b = model(x), model(y)
    assert torch.equal(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])
