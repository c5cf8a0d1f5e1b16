"""SwiGLU experts stored as stacked weights and computed grouped, never one Python call per expert.

Weights follow the per-expert ``nn.Linear`` layout (out, in): ``gate_up_proj`` [E, 2H, D] holds the gate
rows then the up rows, ``down_proj`` [E, D, H]; optional biases (gpt-oss) ``gate_up_proj_bias`` [E, 2H] and
``down_proj_bias`` [E, D].  The activation is SwiGLU or gpt-oss's clamped SwiGLU (``activation``).  Rows
arrive grouped by expert with ``counts`` per expert.

- ``grouped_mm``: ``torch._grouped_mm`` over the unpadded groups.  Its fast kernel needs a Hopper-class
  GPU and bf16; on CPU torch 2.13 runs it as one matmul per group in C++, which measured faster than the
  padded path (no padding, no scatter/gather), so ``auto`` takes it on CPU too, when d_model and the
  hidden width are whole 16-byte units (its stride rule);
- ``padded``: scatter the groups into [E, max_count, D], one ``bmm`` per projection, gather back.  Padding
  rows are zero, give zero outputs and zero weight gradients, so the result is exact.  ``auto`` falls back
  to it on GPUs without the grouped kernel.

``split_into_chunks(n)`` moves the weights into n ``ExpertChunk`` submodules of E/n experts each, computed
one after the other on their own rows: the same numbers, but a ZeRO-3 engine, which gathers a module's
parameters for its forward and backward, then holds one chunk of a layer's experts at a time instead of all
of them (DeepSpeed's own MoE keeps one module per expert for the same reason).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from sparselm.model.init import module_seed
from sparselm.model.moe.activation import GLUClamp, glu


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``auto`` uses torch._grouped_mm: on CPU always (when torch has it), on CUDA with compute
    capability >= 9.0 in bf16."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def _contiguous_grad(t: torch.Tensor) -> torch.Tensor:
    # torch._grouped_mm's backward rejects gradients with zero strides (e.g. from a plain .sum()).
    if t.requires_grad:
        t.register_hook(lambda g: g.contiguous())
    return t


WEIGHTS = ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
"""The stacked tensors of a layer's experts, in the order ``_compute`` takes them; the biases (gpt-oss) are
optional: ``gate_up_proj_bias`` [E, 2H] (gate then up, like the weight's rows), ``down_proj_bias`` [E, D]."""


class ExpertChunk(nn.Module):
    """Experts [first, first + c) of a ``GroupedExperts`` as their own module: ``gate_up_proj`` [c, 2H, D],
    ``down_proj`` [c, D, H] and the biases if any.  Its forward runs the owner's computation on its rows with
    its weights."""

    def __init__(self, gate_up_proj: nn.Parameter, down_proj: nn.Parameter,
                 gate_up_proj_bias: nn.Parameter | None = None, down_proj_bias: nn.Parameter | None = None):
        super().__init__()
        self.gate_up_proj, self.down_proj = gate_up_proj, down_proj
        self.gate_up_proj_bias, self.down_proj_bias = gate_up_proj_bias, down_proj_bias

    def forward(self, x: torch.Tensor, counts: torch.Tensor, compute) -> torch.Tensor:
        return compute(x, counts, *(getattr(self, w) for w in WEIGHTS))


class GroupedExperts(nn.Module):
    def __init__(self, num_experts: int, d_model: int, hidden: int, init_std: float = 0.02,
                 out_std: float = 0.02, impl: str = "auto", bias: bool = False, clamp: GLUClamp | None = None):
        super().__init__()
        self.num_experts = num_experts
        """Experts of the whole layer (all expert-parallel ranks together)."""
        self.first_expert = 0
        """Global index of this module's first expert (non-zero on expert-parallel ranks > 0)."""
        self.hidden, self.init_std, self.out_std, self.impl = hidden, init_std, out_std, impl
        self.clamp = clamp
        """The gated activation's clamp, gain and offset (``activation.GLUClamp``); None: plain SwiGLU."""
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * hidden, d_model))
        self.down_proj = nn.Parameter(torch.empty(num_experts, d_model, hidden))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * hidden)) if bias else None
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, d_model)) if bias else None
        self.chunks: nn.ModuleList | None = None
        """``split_into_chunks``: the weights as ``ExpertChunk`` modules (then this module holds none itself)."""

    @property
    def num_local_experts(self) -> int:
        held = [c.gate_up_proj for c in self.chunks] if self.chunks is not None else [self.gate_up_proj]
        # ds_shape: a ZeRO-3 partitioned parameter's data is flat and empty between gathers
        return sum(getattr(w, "ds_shape", w.shape)[0] for w in held)

    def split_into_chunks(self, n: int, cut) -> None:
        """Hold the weights (and biases) as ``n`` ``ExpertChunk`` modules of ``num_local_experts / n`` experts
        each, in order.  ``cut(param, index, n) -> Parameter``: chunk ``index`` of ``param`` along its experts
        (dim 0), with whatever attributes the caller keeps (``sparselm.parallel.zero3`` records the cut as a
        placement, so checkpoints keep the canonical tensors).  Raises ValueError when ``n`` does not divide them."""
        if self.chunks is not None:
            raise ValueError("the experts are already split into chunks")
        if n < 1 or self.num_local_experts % n:
            raise ValueError(f"{self.num_local_experts} local experts cannot be split into {n} equal chunks")
        held = [getattr(self, w) for w in WEIGHTS]
        for w in WEIGHTS:
            delattr(self, w)
            self.register_parameter(w, None)
        self.chunks = nn.ModuleList(ExpertChunk(*(None if p is None else cut(p, i, n) for p in held))
                                    for i in range(n))

    init_by_rows = True
    """Each expert (a row along dim 0 of both tensors) is drawn from its own stream, so a rank can draw only
    the experts it holds (``sparselm.model.init.InitSource.rows``)."""

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Normal(0, init_std) gate/up and Normal(0, out_std) down weights; global expert ``first_expert + e``
        from a stream seeded by the current seed (the module's, under sparselm.model.init) and its index;
        biases zero."""
        base = torch.initial_seed()
        for e in range(self.num_local_experts):
            stream = torch.Generator().manual_seed(module_seed(base, f"expert{self.first_expert + e}"))
            self.gate_up_proj[e].normal_(0.0, self.init_std, generator=stream)
            self.down_proj[e].normal_(0.0, self.out_std, generator=stream)
        for bias in (self.gate_up_proj_bias, self.down_proj_bias):
            if bias is not None:
                bias.zero_()

    def params_per_expert(self) -> int:
        owner = self.chunks[0] if self.chunks is not None else self
        held = [getattr(owner, w) for w in WEIGHTS if getattr(owner, w) is not None]
        return sum(math.prod(getattr(w, "ds_shape", w.shape)[1:]) for w in held)

    def wrap_weights(self, *weights: torch.Tensor | None) -> tuple:
        """(gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias) as the forward uses them (a parallel
        subclass may wrap them; absent biases stay None)."""
        return weights

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, D] grouped by local expert, counts [E_local] (sum M) -> [M, D]."""
        if self.chunks is None:
            return self._compute(x, counts, *(getattr(self, w) for w in WEIGHTS))
        per_chunk = counts.numel() // len(self.chunks)
        chunk_counts = counts.split(per_chunk)
        rows = x.split(counts.view(len(self.chunks), per_chunk).sum(1).tolist())  # one host sync
        return torch.cat([chunk(r, c, self._compute) for chunk, r, c in zip(self.chunks, rows, chunk_counts)])

    def _compute(self, x: torch.Tensor, counts: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                 gate_up_bias: torch.Tensor | None = None, down_bias: torch.Tensor | None = None) -> torch.Tensor:
        weights = self.wrap_weights(gate_up, down, gate_up_bias, down_bias)
        impl = self.impl
        if impl == "auto":
            impl = "grouped_mm" if grouped_mm_supported(x.device, x.dtype) and self._aligned(x, down) else "padded"
        if impl == "grouped_mm" and x.shape[0] > 0:
            if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
                # torch.compile's shape function of _grouped_mm accepts bf16 only (eager also runs fp32 on CPU)
                return _eager_grouped_mm(x, counts, *weights, self.clamp)
            return self._grouped_mm(x, counts, *weights, self.clamp)
        return self._padded(x, counts, *weights, self.clamp)

    @staticmethod
    def _aligned(x: torch.Tensor, down: torch.Tensor) -> bool:
        """torch._grouped_mm needs 16-byte aligned strides ("strides should be multiple of 16 bytes"): the model
        width and the (local) expert hidden width in whole 16-byte units, e.g. hidden 21 in fp32 is not."""
        return all(n * x.element_size() % 16 == 0 for n in (x.shape[-1], down.shape[-1]))

    @staticmethod
    def _grouped_mm(x, counts, gate_up, down, gate_up_bias, down_bias, clamp) -> torch.Tensor:
        offs = torch.cumsum(counts, 0).to(device=x.device, dtype=torch.int32)
        h = _contiguous_grad(torch._grouped_mm(x, gate_up.transpose(-2, -1), offs=offs))
        expert_of_row = None
        if gate_up_bias is not None or down_bias is not None:  # each row's expert, without a host sync
            expert_of_row = torch.repeat_interleave(torch.arange(counts.numel(), device=x.device), counts,
                                                    output_size=x.shape[0])
        if gate_up_bias is not None:
            h = h + gate_up_bias.index_select(0, expert_of_row)
        out = _contiguous_grad(torch._grouped_mm(glu(h, clamp), down.transpose(-2, -1), offs=offs))
        if down_bias is not None:
            out = out + down_bias.index_select(0, expert_of_row)
        return out

    @staticmethod
    def _padded(x, counts, gate_up, down, gate_up_bias, down_bias, clamp) -> torch.Tensor:
        # With no rows (an expert-parallel rank nobody routed to) this still builds the graph, so the
        # weights get zero gradients like on every other rank.  Padding rows get the biases too, but their
        # outputs are never gathered, so they give no gradient.
        n_exp, d = counts.numel(), x.shape[1]
        cap = int(counts.max())
        starts = torch.cumsum(counts, 0) - counts
        row = torch.arange(x.shape[0], device=x.device)
        expert_of_row = torch.repeat_interleave(torch.arange(n_exp, device=x.device), counts, output_size=x.shape[0])
        slot = expert_of_row * cap + row - starts[expert_of_row]
        padded = x.new_zeros(n_exp * cap, d).index_copy(0, slot, x).view(n_exp, cap, d)
        h = torch.bmm(padded, gate_up.transpose(1, 2))
        if gate_up_bias is not None:
            h = h + gate_up_bias.unsqueeze(1)
        out = torch.bmm(glu(h, clamp), down.transpose(1, 2))
        if down_bias is not None:
            out = out + down_bias.unsqueeze(1)
        return out.reshape(n_exp * cap, d).index_select(0, slot)


_eager_grouped_mm = torch.compiler.disable(GroupedExperts._grouped_mm)
