"""gpt-oss's MoE pieces against written-out references: the clamped SwiGLU (forward and its own backward in
float64), and an MoE layer with a biased router, biased experts and the clamp on every expert path (grouped
GEMM, padded, ZeRO-3-style chunks), token by token."""
import pytest
import torch
from torch import nn

from sparselm.model.moe import MoELayer
from sparselm.model.moe.activation import GLUClamp, glu

GPT_OSS = GLUClamp(limit=7.0, alpha=1.702, up_offset=1.0)


def gpt_oss_gate(gate, up, limit=7.0, alpha=1.702):
    """transformers' GptOssExperts._apply_gate on de-interleaved halves."""
    gate = gate.clamp(min=None, max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def test_clamped_swiglu_forward_and_backward_equal_autograd_of_the_formula():
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(64, 2 * 24, generator=g, dtype=torch.float64) * 6).requires_grad_()  # many beyond the limit
    out = glu(h, GPT_OSS)
    ref = gpt_oss_gate(*h.chunk(2, dim=-1))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    seed = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (got,) = torch.autograd.grad(out, h, seed)
    (want,) = torch.autograd.grad(ref, h, seed)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: glu(t, GPT_OSS), (h[:4, :8].detach().clone().requires_grad_() * 0.5,))


def _layer(impl):
    torch.manual_seed(0)
    layer = MoELayer(16, 6, 2, 8, router_bias=True, expert_bias=True, clamp=GPT_OSS, expert_impl=impl,
                     aux_loss_coef=0.0, z_loss_coef=0.0)
    for m in layer.modules():
        if m is not layer and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    with torch.no_grad():  # non-zero biases and weights large enough to reach the clamp
        for p in (layer.router.bias, layer.experts.gate_up_proj_bias, layer.experts.down_proj_bias):
            p.normal_(0, 1)
        layer.experts.gate_up_proj.mul_(40)
    return layer


def _reference(layer, x):
    """gpt-oss's MLP token by token: top-k of the biased logits, softmax over the chosen logits, biased experts."""
    r, e, hidden = layer.router, layer.experts, layer.experts.hidden
    outs = []
    for t in x.reshape(-1, x.shape[-1]):
        logits = r.weight @ t + r.bias
        top = logits.topk(layer.top_k)
        weights = top.values.softmax(-1)
        y = 0
        for w, i in zip(weights, top.indices):
            h = e.gate_up_proj[i] @ t + e.gate_up_proj_bias[i]
            y = y + w * (e.down_proj[i] @ gpt_oss_gate(h[:hidden], h[hidden:]) + e.down_proj_bias[i])
        outs.append(y)
    return torch.stack(outs).view(x.shape)


def _chunk(p, i, n):
    rows = p.shape[0] // n
    return nn.Parameter(p.detach()[i * rows:(i + 1) * rows].clone())


@pytest.mark.parametrize("impl, chunks", [("grouped_mm", 1), ("padded", 1), ("grouped_mm", 3)])
def test_biased_clamped_moe_equals_gpt_oss_token_by_token(impl, chunks):
    layer = _layer(impl)
    ref_layer = _layer(impl)
    if chunks > 1:
        layer.experts.split_into_chunks(chunks, _chunk)
    x = torch.randn(2, 9, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, _ = layer(x)
    ref = _reference(ref_layer, x)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    assert (layer.experts.clamp.limit, layer.router.bias.shape) == (7.0, (6,))
    grad = torch.randn_like(y)
    (gx, *gp) = torch.autograd.grad(y, [x, *layer.parameters()], grad)
    (rx, *rp) = torch.autograd.grad(ref, [x, *ref_layer.parameters()], grad)
    torch.testing.assert_close(gx, rx, rtol=1e-4, atol=1e-5)
    ref_grads = dict(zip([n for n, _ in ref_layer.named_parameters()], rp))
    for (name, _), g in zip(layer.named_parameters(), gp):
        canonical = name.replace(".chunks.", ".").split(".")
        if "chunks" in name:  # experts.chunks.c.W -> rows c of experts.W
            c, w = int(name.split(".")[2]), name.split(".")[3]
            full = ref_grads[f"experts.{w}"]
            rows = full.shape[0] // chunks
            torch.testing.assert_close(g, full[c * rows:(c + 1) * rows], rtol=1e-4, atol=1e-5)
        else:
            torch.testing.assert_close(g, ref_grads[".".join(canonical)], rtol=1e-4, atol=1e-5)
