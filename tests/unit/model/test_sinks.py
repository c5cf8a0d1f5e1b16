"""Learned attention sinks equal an explicit float64 softmax over the visible keys plus the sink, outputs and
gradients (sinks included), on every attention path: dense causal and windowed SDPA, the sparse patterns'
reference and block-sparse paths with and without persistent memory, grouped-query heads; FlexAttention's
forward (eager on CPU) agrees."""
import pytest
import torch

from sparselm.model.attention import Attention
from sparselm.model.sparse_attention.kernels import sparse_attention
from sparselm.config import load_config
from test_sparse_attention_kernels import inputs, reference_mask
from test_sparse_attention_patterns import spec

T, N = 140, 3  # two query blocks of the block-sparse path, the last partial


def explicit_with_sinks(q, k, v, mk, mv, sinks, mask, qm=None):
    """softmax over [scores | sink] with the sink column dropped, times the values, written out."""
    b, rep = q.shape[0], q.shape[1] // k.shape[1]
    k, mk = k.repeat_interleave(rep, 1), mk.expand(b, -1, -1, -1).repeat_interleave(rep, 1)
    v = torch.cat([v, mv.expand(b, -1, -1, -1)], 2).repeat_interleave(rep, 1)
    qm = q if qm is None else qm
    scores = torch.cat([q @ k.transpose(-1, -2), qm @ mk.transpose(-1, -2)], -1) / q.shape[-1] ** 0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.view(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    return torch.cat([scores, sink], -1).softmax(-1)[..., :-1] @ v


def make_sinks(heads=4):
    return (torch.randn(heads, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2).requires_grad_()


@pytest.mark.parametrize("backend", ["reference", "block_sparse"])
@pytest.mark.parametrize("n", [0, N])
@pytest.mark.parametrize("name", ["causal", "sliding_window", "bigbird"])
def test_sparse_paths_equal_explicit_softmax_with_sink(name, n, backend):
    q, k, v, mk, mv = inputs(n, t=T)
    sinks = make_sinks()
    memory = (mk, mv) if n else None
    qm = q * 0.5 if n else None  # memory scored against another query, as SparseAttention does
    out = sparse_attention(q, k, v, spec(name), memory, backend, memory_query=qm, sinks=sinks)
    ref = explicit_with_sinks(q, k, v, mk, mv, sinks, reference_mask(name, T, n), qm)
    tensors = (q, k, v, sinks) + ((mk, mv) if n else ())
    seed = torch.ones_like(ref).cos()
    got = torch.autograd.grad(out, tensors, seed, retain_graph=True)
    want = torch.autograd.grad(ref, tensors, seed)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


def test_flex_forward_rescales_by_lse():
    q, k, v, mk, mv = (x.detach() for x in inputs(N, dtype=torch.float32, t=T))
    sinks = make_sinks().detach().float()
    with torch.no_grad():
        flex = sparse_attention(q, k, v, spec("sliding_window"), (mk, mv), "flex", sinks=sinks)
        ref = sparse_attention(q, k, v, spec("sliding_window"), (mk, mv), "reference", sinks=sinks)
    torch.testing.assert_close(flex, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [0, 5])
def test_dense_attention_with_sinks_equals_explicit(window):
    cfg = load_config("tiny_dense", {"model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "attention_sinks": True,
                                               "o_bias": True, "qkv_bias": True}}, check=False)
    attn = Attention(cfg.model, window=window).double()
    q, k, v, _, _ = inputs(0, t=12)
    q, k, v = (x[..., :8].detach().requires_grad_() for x in (q, k, v))
    with torch.no_grad():
        attn.sinks.copy_(make_sinks())
    out = attn.attend(q, k, v)
    pos = torch.arange(12)
    lag = pos[:, None] - pos[None, :]
    mask = (lag >= 0) & ((lag < window) if window else True)
    qr, kr = attn.rotary(q), attn.rotary(k)
    empty = torch.zeros(2, 0, 8, dtype=torch.float64)
    ref = explicit_with_sinks(qr, kr, v, empty, empty, attn.sinks, mask)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    got = torch.autograd.grad(out.square().sum(), (q, k, v, attn.sinks))
    want = torch.autograd.grad(ref.square().sum(), (q, k, v, attn.sinks))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.gpu(reason="needs a CUDA GPU: compiled FlexAttention's backward through the log-sum-exp")
@pytest.mark.parametrize("name", ["sliding_window", "bigbird"])
def test_compiled_flex_with_sinks_on_gpu_equals_explicit(name):
    t = 512
    q, k, v, mk, mv = (x.detach().float().cuda().requires_grad_() for x in inputs(N, t=t))
    sinks = make_sinks().detach().float().cuda().requires_grad_()
    qm = q.detach().flip(2).requires_grad_()
    tensors = (q, k, v, mk, mv, qm, sinks)
    out = sparse_attention(q, k, v, spec(name), (mk, mv), "flex", memory_query=qm, sinks=sinks)
    ref = explicit_with_sinks(q, k, v, mk, mv, sinks, reference_mask(name, t, N).cuda(), qm)
    seed = torch.ones_like(ref).cos()
    got, want = torch.autograd.grad(out, tensors, seed), torch.autograd.grad(ref, tensors, seed)
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)
