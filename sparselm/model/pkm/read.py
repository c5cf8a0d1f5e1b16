"""The memory read ``out[t] = sum_k w[t, k] * values[slots[t, k]]`` with a faster values gradient.

``F.embedding_bag`` computes the forward and the weights' gradient well, but its dense backward for the
table sorts int64 indices and zero-fills the whole table before accumulating.  The same gradient,
``grad_values[s] = sum of w[t, k] * grad[t] over the reads (t, k) of slot s``, is itself an
embedding_bag over the rows of ``grad``, bagged by slot: one cheap int32 sort and a kernel that writes
every table row once (empty bags give zero rows).  The result is identical; the gradient stays dense,
as data parallelism and ZeRO require.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def values_grad(grad: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, n_rows: int) -> torch.Tensor:
    """[n_rows, width] gradient of the table; grad [n, width], slots and weights [n, reads]."""
    flat = slots.reshape(-1)
    _, order = torch.sort(flat, stable=True)  # stable: a fixed summation order, so runs are reproducible
    tokens = torch.div(order, slots.shape[1], rounding_mode="floor")
    counts = torch.bincount(flat, minlength=n_rows)
    offsets = torch.cumsum(counts, 0) - counts
    return F.embedding_bag(tokens, grad, offsets, per_sample_weights=weights.reshape(-1)[order].to(grad.dtype),
                           mode="sum")


class _ValuesGrad(torch.autograd.Function):
    """Identity on the read's output; supplies the table's gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, out, values, slots, weights):
        ctx.save_for_backward(slots, weights)
        ctx.n_rows = values.shape[0]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        slots, weights = ctx.saved_tensors
        table = values_grad(grad.contiguous(), slots, weights, ctx.n_rows) if ctx.needs_input_grad[1] else None
        return grad, table, None, None


def weighted_read(values: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """values [rows, width], slots [n, reads] (int32 or int64), weights [n, reads] -> [n, width]."""
    out = F.embedding_bag(slots, values.detach(), per_sample_weights=weights, mode="sum")
    return _ValuesGrad.apply(out, values, slots, weights.detach())
