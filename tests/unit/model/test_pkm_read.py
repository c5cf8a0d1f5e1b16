"""The PKM weighted read (sparselm/model/pkm/read.py) against the path it replaced, F.embedding_bag with
per_sample_weights and its own backward: the same outputs and gradients in fp32 (1e-6), close in bf16,
alone (both backward paths: reads grouped by row, CPU's in fp32, and token chunks, CUDA's and bf16's, with
several chunks and repeated rows) and inside every PKM variant (plain, Memory+ gate, output projection,
shared table).  The tensor-parallel variant reads through the same function
(tests/distributed/test_pkm_distributed.py compares it with the unsharded layer)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from support.pkm_reference import pkm_cfg
from sparselm.model.pkm import ProductKeyMemory, read as pkm_read
from sparselm.model.pkm.read import weighted_read


def old_read(slots, weights, values):
    return F.embedding_bag(slots, values, per_sample_weights=weights.to(values.dtype), mode="sum")


def _inputs(dtype, n=37, m=12, rows=50, v_dim=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    slots = torch.randint(0, rows, (n, m), generator=g)  # 37 x 12 reads of 50 rows: many repeats
    weights = torch.softmax(torch.randn(n, m, generator=g), -1).to(dtype)
    values = torch.randn(rows, v_dim, generator=g).to(dtype)
    grad = torch.randn(n, v_dim, generator=g).to(dtype)
    return slots, weights, values, grad


def _run(fn, slots, weights, values, grad):
    w, v = weights.clone().requires_grad_(), values.clone().requires_grad_()
    out = fn(slots, w, v)
    out.backward(grad)
    return out.detach(), w.grad, v.grad


BACKWARDS = {"by_row": (pkm_read.BY_ROW_DTYPES, 1 << 22), "chunked_one": ((), 1 << 22),
             "chunked_eight": ((), 5 * 12 * 24)}  # 8 chunks of 5 tokens, the last ragged


@pytest.mark.parametrize("backward", BACKWARDS)
def test_read_equals_embedding_bag_in_fp32(monkeypatch, backward):
    by_row_dtypes, chunk = BACKWARDS[backward]
    monkeypatch.setattr(pkm_read, "BY_ROW_DTYPES", by_row_dtypes)
    monkeypatch.setitem(pkm_read.CHUNK_ELEMENTS, "cpu", chunk)
    calls = []
    for name in ("_backward_by_row", "_backward_chunked"):
        monkeypatch.setattr(pkm_read, name, lambda *a, f=getattr(pkm_read, name), name=name: calls.append(name) or f(*a))
    args = _inputs(torch.float32)
    new, old = _run(weighted_read, *args), _run(old_read, *args)
    for a, b, name in zip(new, old, ("output", "weights grad", "values grad")):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)
    assert calls == ["_backward_by_row" if backward == "by_row" else "_backward_chunked"]


def test_by_row_backward_handles_unread_rows_and_one_gradient_at_a_time():
    """Rows nobody read get a zero gradient; with only one input needing a gradient the other is skipped."""
    slots, weights, values, grad = _inputs(torch.float32, rows=500)  # most of the 500 rows unread
    _, gw, gv = _run(old_read, slots, weights, values, grad)
    for need_weights, need_values in ((True, False), (False, True)):
        got_w, got_v = pkm_read._backward_by_row(slots, weights, values, grad, need_weights, need_values)
        assert (got_w is None) != need_weights and (got_v is None) != need_values
        if need_weights:
            torch.testing.assert_close(got_w, gw, rtol=1e-6, atol=1e-6)
        if need_values:
            torch.testing.assert_close(got_v, gv, rtol=1e-6, atol=1e-6)
            unread = torch.ones(500, dtype=torch.bool).index_fill_(0, slots.reshape(-1), False)
            assert unread.sum() > 0 and got_v[unread].eq(0).all()


def test_read_in_bf16_is_close_to_fp64():
    slots, weights, values, grad = _inputs(torch.bfloat16)
    new = _run(weighted_read, slots, weights, values, grad)
    ref = _run(old_read, slots, weights.double(), values.double(), grad.double())
    for a, b, name in zip(new, ref, ("output", "weights grad", "values grad")):
        assert a.dtype == torch.bfloat16, name
        # one bf16 rounding of each product/output (8 bits of mantissa): accumulation is in fp32
        torch.testing.assert_close(a.double(), b, rtol=2e-2, atol=2e-2, msg=name)


VARIANTS = {"plain": [], "gated": ["--pkm.gated=true"], "projected": ["--pkm.v_dim=24"],
            "batchnorm": ["--pkm.query_norm=batchnorm"]}


def _pair(extra, shared):
    """The same PKM layers twice: one reading through weighted_read, one through the old embedding_bag path.
    ``shared``: two layers, the second reading the first's table."""
    cfg = pkm_cfg(*extra)
    torch.manual_seed(0)
    layers = [ProductKeyMemory(32, cfg.pkm) for _ in range(2 if shared else 1)]
    if shared:
        layers[1].shared_from, layers[1].values = 0, layers[0].values
    old = copy.deepcopy(layers)
    for layer in old:
        layer.read = lambda slots, weights, self=layer: old_read(slots.reshape(slots.shape[0], -1),
                                                                  weights.reshape(slots.shape[0], -1), self.values)
    return layers, old


def _step(layers, x, dy):
    x = x.clone().requires_grad_()
    y = x
    for layer in layers:
        y = layer(y)
    (y.float() * dy).sum().backward()
    grads = {f"{i}.{n}": p.grad for i, layer in enumerate(layers) for n, p in layer.named_parameters()}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("shared", [False, True], ids=["own_table", "shared_table"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_pkm_variant_equals_the_old_path(variant, shared):
    new, old = _pair(VARIANTS[variant], shared)
    x, dy = torch.randn(2, 9, 32), torch.randn(2, 9, 32)
    y_new, gx_new, g_new = _step(new, x, dy)
    y_old, gx_old, g_old = _step(old, x, dy)
    torch.testing.assert_close(y_new, y_old, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx_new, gx_old, rtol=1e-6, atol=1e-6)
    for name, g in g_new.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, g_old[name], rtol=1e-6, atol=1e-6, msg=name)

    # bf16: both paths make the same lookup in bf16 (the old one's weights gradient is missing for bf16 on
    # CUDA, present on CPU); the reads differ only in rounding.
    new_bf, old_bf = _pair(VARIANTS[variant], shared)
    y_new, gx_new, g_new = _step([layer.bfloat16() for layer in new_bf], x.bfloat16(), dy)
    y_old, gx_old, g_old = _step([layer.bfloat16() for layer in old_bf], x.bfloat16(), dy)
    torch.testing.assert_close(y_new, y_old, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx_new, gx_old, rtol=2e-2, atol=2e-2)
    for name, g in g_new.items():
        assert g.dtype == torch.bfloat16, name
        torch.testing.assert_close(g, g_old[name], rtol=2e-2, atol=2e-2, msg=name)
