"""The experts' gated activation on ``h = [gate | up]`` (the gate_up projection's output, gate half first).

- plain SwiGLU (Shazeer 2020): ``silu(gate) * up``;
- clamped SwiGLU (gpt-oss, as transformers' ``GptOssExperts._apply_gate`` and OpenAI's reference compute it):
  ``(clamp(up, -limit, limit) + up_offset) * g * sigmoid(alpha * g)`` with ``g = clamp(gate, max=limit)``;
  gpt-oss uses limit 7, alpha 1.702, up_offset 1.  ``limit`` 0 means no clamp.

Both are autograd Functions that save only ``h`` and write the two halves of its gradient in place (no
concatenation); the clamps pass the gradient where the input lies inside the closed range, as ``torch.clamp``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class GLUClamp:
    """Parameters of the clamped SwiGLU (``moe.swiglu_limit``, ``moe.swiglu_alpha``, ``moe.swiglu_up_offset``)."""

    limit: float = 0.0
    """Gate clamped above at limit, up clamped to [-limit, limit]; 0: no clamp."""
    alpha: float = 1.0
    """Gain inside the sigmoid of the gate: g * sigmoid(alpha * g) (1: silu)."""
    up_offset: float = 0.0
    """Added to the (clamped) up half before the product (gpt-oss: 1)."""

    @property
    def plain(self) -> bool:
        """silu(gate) * up exactly."""
        return self.limit == 0 and self.alpha == 1 and self.up_offset == 0


class _SwiGLU(torch.autograd.Function):
    """silu(gate) * up on h = [gate | up]; the backward writes both halves of dh in place (no concatenation,
    only h saved)."""

    @staticmethod
    def forward(ctx, h):
        gate, up = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        gate, up = h.chunk(2, dim=-1)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.mul(grad, F.silu(gate), out=d_up)
        torch.ops.aten.silu_backward.grad_input(grad * up, gate, grad_input=d_gate)
        return dh


class _ClampedSwiGLU(torch.autograd.Function):
    """The clamped SwiGLU on h = [gate | up]; only h saved, dh written half by half."""

    @staticmethod
    def forward(ctx, h, limit: float, alpha: float, up_offset: float):
        ctx.save_for_backward(h)
        ctx.params = (limit, alpha, up_offset)
        g, u = _clamped_halves(h, limit, up_offset)
        return (g * torch.sigmoid(alpha * g)) * u

    @staticmethod
    def backward(ctx, grad):
        (h,) = ctx.saved_tensors
        limit, alpha, up_offset = ctx.params
        gate, up = h.chunk(2, dim=-1)
        g, u = _clamped_halves(h, limit, up_offset)
        s = torch.sigmoid(alpha * g)
        dh = torch.empty_like(h)
        d_gate, d_up = dh.chunk(2, dim=-1)
        torch.mul(grad, g * s, out=d_up)
        torch.mul(grad * u, s * (1 + alpha * g * (1 - s)), out=d_gate)
        if limit:
            d_gate.masked_fill_(gate > limit, 0)
            d_up.masked_fill_(up.abs() > limit, 0)
        return dh, None, None, None


def _clamped_halves(h: torch.Tensor, limit: float, up_offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    gate, up = h.chunk(2, dim=-1)
    if limit:
        gate, up = gate.clamp(max=limit), up.clamp(-limit, limit)
    return gate, up + up_offset


def glu(h: torch.Tensor, clamp: GLUClamp | None = None) -> torch.Tensor:
    """h [..., 2H] = [gate | up] -> [..., H]: plain SwiGLU when ``clamp`` is None or plain, else the clamped one."""
    if clamp is None or clamp.plain:
        return _SwiGLU.apply(h)
    return _ClampedSwiGLU.apply(h, clamp.limit, clamp.alpha, clamp.up_offset)
