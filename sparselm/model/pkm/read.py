"""The weighted read of product-key memory values: out[t] = sum_j weights[t, j] * values[slots[t, j]].

One autograd function for every PKM path (plain, Memory+, shared tables, value columns sharded under
tensor parallelism), on any device and dtype:
- forward: ``F.embedding_bag`` in the values' dtype (its sum accumulates in fp32 on CPU and CUDA; no
  [tokens, slots, v_dim] tensor is made);
- backward on CPU in fp32/fp64 (``_backward_by_row``): the reads are grouped by value row with one stable
  sort of the slots (a CSR pattern: rows x tokens).  The values' gradient is then an ``embedding_bag``
  over each row's readers (every row written once: no zero fill, no scatter of a [reads, v_dim] tensor)
  and the weights' gradient a sampled matmul, ``values @ grad^T`` at the read positions
  (``torch.sparse.sampled_addmm``: every value row is read once, not once per read).  Both are
  deterministic.
- backward elsewhere (``_backward_chunked``: CUDA, bf16/fp16): the weights' gradient as a batched dot
  product of the output gradient with the gathered rows, the values' gradient as an index-add of
  weight x output gradient over the read rows (into fp32 when the values are bf16/fp16), over token
  chunks so the gathered rows never exist for all tokens at once.
``embedding_bag``'s own ``per_sample_weights`` backward is not used: it is missing for bf16 on CUDA in
the torch releases that many clusters run, and on CPU it is a scalar loop (the slowest part of a PKM step).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

# Elements of gathered rows per backward chunk: small enough to stay in a CPU's cache, large enough
# that a GPU runs few, full kernels.
CHUNK_ELEMENTS = {"cpu": 1 << 22, "cuda": 1 << 27}
# Where the backward groups reads by row (torch's CPU sampled_addmm takes fp32/fp64 only).
BY_ROW_DTYPES = (torch.float32, torch.float64)


def _chunk_tokens(slots: torch.Tensor, v_dim: int) -> int:
    budget = CHUNK_ELEMENTS.get(slots.device.type, 1 << 24)
    return max(1, budget // max(1, slots.shape[1] * v_dim))


def _backward_by_row(slots, weights, values, grad, need_weights: bool, need_values: bool):
    n, m = slots.shape
    rows = values.shape[0]
    flat = slots.reshape(-1)
    order = torch.argsort(flat, stable=True)  # reads in row order
    readers = order // m  # the token of each read
    counts = torch.bincount(flat, minlength=rows)
    starts = counts.cumsum(0) - counts  # first read of each row
    grad_weights = grad_values = None
    if need_values:  # row r receives sum over its reads (t, j) of weights[t, j] * grad[t]
        grad_values = F.embedding_bag(readers, grad, starts, per_sample_weights=weights.reshape(-1)[order],
                                      mode="sum")
    if need_weights:  # d out[t] / d weights[t, j] = values[slots[t, j]]: values @ grad^T at the read positions
        crow = torch.cat([starts, starts.new_full((1,), flat.numel())])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta state"
            pattern = torch.sparse_csr_tensor(crow, readers, values.new_zeros(flat.numel()), size=(rows, n),
                                              check_invariants=False)
            dots = torch.sparse.sampled_addmm(pattern, values, grad.t(), beta=0).values()
        grad_weights = torch.empty_like(dots).index_put_((order,), dots).view(n, m)
    return grad_weights, grad_values


def _backward_chunked(slots, weights, values, grad, need_weights: bool, need_values: bool):
    n, m = slots.shape
    v_dim = values.shape[1]
    grad_weights = torch.empty(n, m, 1, dtype=values.dtype, device=values.device) if need_weights else None
    grad_values = None
    acc = torch.float32 if values.dtype in (torch.bfloat16, torch.float16) else values.dtype
    if need_values:
        grad_values = torch.empty(values.shape, dtype=acc, device=values.device).zero_()
    step = min(n, _chunk_tokens(slots, v_dim))
    # One buffer per chunk's rows / contributions, reused: a fresh large tensor per chunk costs page
    # faults on CPU and allocator traffic on GPU.
    buf = torch.empty(step * m, v_dim, dtype=values.dtype, device=values.device)
    for start in range(0, n, step):
        s, g = slots[start:start + step], grad[start:start + step]
        c = s.shape[0]
        flat, chunk = s.reshape(-1), buf[:c * m]
        if need_weights:  # d out[t] / d weights[t, j] = values[slots[t, j]]
            rows = torch.index_select(values, 0, flat, out=chunk).view(c, m, v_dim)
            torch.bmm(rows, g.unsqueeze(2), out=grad_weights[start:start + step])
        if need_values:  # row slots[t, j] receives weights[t, j] * grad[t]
            contrib = torch.mul(weights[start:start + step].unsqueeze(2), g.unsqueeze(1), out=chunk.view(c, m, v_dim))
            grad_values.index_add_(0, flat, contrib.view(-1, v_dim).to(acc))
    if grad_weights is not None:
        grad_weights = grad_weights.view(n, m)
    if grad_values is not None:
        grad_values = grad_values.to(values.dtype)
    return grad_weights, grad_values


class WeightedRead(torch.autograd.Function):
    """slots [n, m] (long), weights [n, m] (values' dtype), values [rows, v_dim] -> [n, v_dim]."""

    @staticmethod
    def forward(ctx, slots, weights, values):
        ctx.save_for_backward(slots, weights, values)
        return F.embedding_bag(slots, values, per_sample_weights=weights, mode="sum")

    @staticmethod
    def backward(ctx, grad):
        slots, weights, values = ctx.saved_tensors
        need_weights, need_values = ctx.needs_input_grad[1], ctx.needs_input_grad[2]
        grad = grad.to(values.dtype).contiguous()
        by_row = values.device.type == "cpu" and values.dtype in BY_ROW_DTYPES
        backward = _backward_by_row if by_row else _backward_chunked
        grad_weights, grad_values = backward(slots, weights, values, grad, need_weights, need_values)
        if grad_weights is not None:
            grad_weights = grad_weights.to(weights.dtype)
        return None, grad_weights, grad_values


def weighted_read(slots: torch.Tensor, weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Weighted sum of value rows.  slots: [n, m] integer row indices into ``values`` [rows, v_dim];
    weights: [n, m] (cast to the values' dtype). Returns [n, v_dim] in the values' dtype."""
    return WeightedRead.apply(slots, weights.to(values.dtype), values)
