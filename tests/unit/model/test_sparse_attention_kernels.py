"""Every execution path of every pattern equals an explicit softmax over the materialised mask."""
import warnings

import pytest
import torch

from sparselm.model.sparse_attention.kernels import sparse_attention
from test_sparse_attention_patterns import PATTERNS, naive_mask, random_block_table, spec

T, N = 300, 5  # 300: three query blocks of the block-sparse path, the last one partial
needs_cuda = pytest.mark.gpu(reason="needs a CUDA GPU")


def reference_mask(name: str, t: int, n: int) -> torch.Tensor:
    s = spec(name)
    mask = naive_mask(s, t)
    if name == "bigbird":
        blocks = torch.arange(t) // s.block
        mask |= random_block_table(s, -(-t // s.block), "cpu")[blocks[:, None], blocks[None, :]] & torch.ones(t, t, dtype=torch.bool).tril()
    return torch.cat([mask, torch.ones(t, n, dtype=torch.bool)], dim=1)


def explicit_attention(q, k, v, mk, mv, mask, qm=None):
    """softmax(q k^T / sqrt(d) masked) v, written out, with memory slots appended to keys and values;
    the memory keys are scored against qm (default q)."""
    b, rep = q.shape[0], q.shape[1] // k.shape[1]
    k, mk = k.repeat_interleave(rep, 1), mk.expand(b, -1, -1, -1).repeat_interleave(rep, 1)
    v = torch.cat([v, mv.expand(b, -1, -1, -1)], 2).repeat_interleave(rep, 1)
    qm = q if qm is None else qm
    scores = torch.cat([q @ k.transpose(-1, -2), qm @ mk.transpose(-1, -2)], -1) / q.shape[-1] ** 0.5
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def inputs(n: int, heads=4, kv_heads=2, dtype=torch.float64, device="cpu", t=T):
    g = torch.Generator().manual_seed(0)
    make = lambda *s: torch.randn(*s, generator=g, dtype=dtype).to(device).requires_grad_()  # noqa: E731
    return make(2, heads, t, 16), make(2, kv_heads, t, 16), make(2, kv_heads, t, 16), make(kv_heads, n, 16), make(kv_heads, n, 16)


def run(fn, tensors):
    out = fn(*tensors)
    grads = torch.autograd.grad(out, tensors, torch.ones_like(out).cos(), allow_unused=True)
    return out, grads


@pytest.mark.parametrize("backend", ["reference", "block_sparse"])
@pytest.mark.parametrize("n", [0, N])
@pytest.mark.parametrize("name", PATTERNS)
def test_output_and_grads_equal_explicit_reference(name, n, backend):
    tensors = inputs(n)
    mask = reference_mask(name, T, n)
    want, want_g = run(lambda q, k, v, mk, mv: explicit_attention(q, k, v, mk, mv, mask), tensors)
    got, got_g = run(lambda q, k, v, mk, mv: sparse_attention(q, k, v, spec(name), (mk, mv), backend), tensors)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g if g is not None else torch.zeros_like(w), w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", ["reference", "block_sparse"])
@pytest.mark.parametrize("name", PATTERNS)
def test_memory_query_scores_the_memory_and_nothing_else(name, backend):
    """The query before rotary scores the memory keys; the context keys keep the rotated query."""
    tensors = inputs(N) + (inputs(N)[0].detach().flip(2).requires_grad_(),)
    mask = reference_mask(name, T, N)
    want, want_g = run(lambda q, k, v, mk, mv, qm: explicit_attention(q, k, v, mk, mv, mask, qm), tensors)
    got, got_g = run(lambda q, k, v, mk, mv, qm: sparse_attention(q, k, v, spec(name), (mk, mv), backend, memory_query=qm), tensors)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("name", PATTERNS)
def test_eager_flex_on_cpu_equals_reference(name):
    """torch 2.13 runs FlexAttention eagerly on CPU, forward only (its backward raises on CPU)."""
    q, k, v, mk, mv = (x.detach() for x in inputs(N, dtype=torch.float32))
    want = explicit_attention(q, k, v, mk, mv, reference_mask(name, T, N))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "flex_attention called without torch.compile()"
        got = sparse_attention(q, k, v, spec(name), (mk, mv), "flex")
        got_qm = sparse_attention(q, k, v, spec(name), (mk, mv), "flex", memory_query=q.flip(2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    want_qm = explicit_attention(q, k, v, mk, mv, reference_mask(name, T, N), q.flip(2))
    torch.testing.assert_close(got_qm, want_qm, rtol=1e-5, atol=1e-5)


@needs_cuda
@pytest.mark.parametrize("name", PATTERNS)
def test_compiled_flex_on_gpu_equals_reference(name):
    """With a separate memory query, as the allattn layers run it (the query's head dim doubles)."""
    tensors = inputs(N, dtype=torch.float32, device="cuda", t=512)
    tensors += (tensors[0].detach().flip(2).requires_grad_(),)
    mask = reference_mask(name, 512, N).cuda()
    want, want_g = run(lambda q, k, v, mk, mv, qm: explicit_attention(q, k, v, mk, mv, mask, qm), tensors)
    got, got_g = run(lambda q, k, v, mk, mv, qm: sparse_attention(q, k, v, spec(name), (mk, mv), "flex", memory_query=qm), tensors)
    torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-4)
    for g, w in zip(got_g, want_g):
        torch.testing.assert_close(g, w, rtol=2e-3, atol=2e-3)
