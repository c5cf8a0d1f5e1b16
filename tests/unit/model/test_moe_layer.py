"""The MoE layer against a per-token dense reference, its expert kernels, and its place in the model."""
import pytest
import torch
import torch.nn.functional as F

from sparselm.config import load_config
from sparselm.model import build_model
from sparselm.model.moe import GroupedExperts, MoELayer


def _layer(**kw):
    torch.manual_seed(0)
    layer = MoELayer(16, 6, kw.pop("k", 2), 8, **kw)
    for m in layer.modules():
        if m is not layer and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    return layer


def _reference(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token: the top-k experts' SwiGLU outputs weighted by their (renormalised) scores."""
    r = layer.router
    hidden = layer.experts.hidden
    outs = []
    for t in x.reshape(-1, x.shape[-1]):
        logits = r.weight @ t
        scores = logits.softmax(-1) if r.score_func == "softmax" else logits.sigmoid()
        top = scores.topk(layer.top_k).indices
        gates = scores[top] / scores[top].sum() if r.renormalize else scores[top]
        y = sum(g * (layer.experts.down_proj[e] @ (F.silu(layer.experts.gate_up_proj[e, :hidden] @ t)
                                                    * (layer.experts.gate_up_proj[e, hidden:] @ t)))
                for g, e in zip(gates, top))
        if layer.shared_experts is not None:
            y = y + layer.shared_experts(t)
        outs.append(y)
    return torch.stack(outs).view(x.shape)


@pytest.mark.parametrize("kw", [
    dict(k=1, renormalize=False),
    dict(k=2),
    dict(k=3, score_func="sigmoid", num_shared_experts=2),
])
def test_dropless_equals_dense_per_token_reference(kw):
    layer = _layer(**kw)
    x = torch.randn(3, 7, 16, requires_grad=True)
    y, _ = layer(x)
    ref = _reference(layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    grad = torch.randn_like(y)
    params = [x, *layer.parameters()]
    for g, g_ref in zip(torch.autograd.grad(y, params, grad), torch.autograd.grad(ref, params, grad)):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no torch._grouped_mm")
def test_grouped_mm_and_padded_kernels_agree():
    torch.manual_seed(0)
    experts = GroupedExperts(5, 16, 12)
    experts.reset_parameters()
    counts = torch.tensor([7, 0, 1, 12, 3])  # uneven, one empty group
    x = torch.randn(int(counts.sum()), 16, requires_grad=True)
    grad = torch.randn(x.shape[0], 16)
    results = []
    for impl in ("grouped_mm", "padded"):
        experts.impl = impl
        y = experts(x, counts)
        results.append((y, *torch.autograd.grad(y, [x, *experts.parameters()], grad)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Row i of group e is x_i through expert e alone.
    e, i = 3, 8  # rows 8..19 belong to expert 3
    h = experts.gate_up_proj[e] @ x[i]
    torch.testing.assert_close(results[0][0][i], experts.down_proj[e] @ (F.silu(h[:12]) * h[12:]))


def test_auto_takes_padded_for_widths_grouped_mm_refuses():
    """torch._grouped_mm wants 16-byte strides: hidden 21 in fp32 (tiny_moe at d_model 32) crashed under auto."""
    torch.manual_seed(0)
    experts = GroupedExperts(4, 32, 21)
    experts.reset_parameters()
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, 32, requires_grad=True)
    y = experts(x, counts)
    y.sum().backward()
    experts.impl = "padded"
    torch.testing.assert_close(y, experts(x, counts))


def test_experts_with_no_rows_still_get_zero_gradients():
    experts = GroupedExperts(3, 8, 4, impl="padded")
    experts.reset_parameters()
    y = experts(torch.zeros(0, 8), torch.zeros(3, dtype=torch.long))
    y.sum().backward()
    assert y.shape == (0, 8)
    assert all(p.grad is not None and not p.grad.any() for p in experts.parameters())


def test_model_with_moe_blocks():
    cfg = load_config("tiny_dense", ["--model.pattern=dense,moe", "--model.n_layers=2", "--model.d_model=64",
                                     "--model.n_heads=2", "--model.vocab_size=128", "--moe.num_experts=4",
                                     "--moe.top_k=2", "--moe.num_shared_experts=1"])
    model = build_model(cfg)
    moe = model.layers[1].ffn
    assert isinstance(moe, MoELayer)
    hidden = cfg.model.ffn_hidden // 3  # (top_k + shared) experts of this width = the dense FFN's width
    assert moe.experts.hidden == hidden and moe.shared_experts.up_proj.out_features == hidden
    # Active parameters: the dense FFN's plus the router.
    dense = model.layers[0].ffn
    assert moe.active_params() == sum(p.numel() for p in dense.parameters()) + moe.router.weight.numel()
    assert model.num_params(active=True) < model.num_params()
    # Init: experts normal(init_std), their down projections scaled like every output projection.
    std = cfg.model.init_std
    assert moe.experts.gate_up_proj.std().item() == pytest.approx(std, rel=0.05)
    assert moe.experts.down_proj.std().item() == pytest.approx(std / 2, rel=0.05)  # 1/sqrt(2 * n_layers)
    ids = torch.randint(0, 128, (2, 16))
    out = model(ids, ids)
    assert out.aux_loss.item() > 0
    out.loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0 and moe.experts.gate_up_proj.grad.abs().sum() > 0
    metrics = model.metrics()
    assert metrics["layer1/expert_load"].shape == (4,)
    assert {"layer1/dropped_frac", "layer1/balance_loss", "layer1/z_loss"} <= set(metrics)


def test_router_runs_in_fp32_for_bf16_models():
    layer = _layer().to(torch.bfloat16)
    x = torch.randn(2, 5, 16, dtype=torch.bfloat16)
    routing = layer.router.route(x.view(-1, 16))
    assert routing.logits.dtype == torch.float32 and routing.gates.dtype == torch.float32
    y, aux = layer(x)
    assert y.dtype == torch.bfloat16 and aux.dtype == torch.float32
