"""``train.compile``: each transformer block compiled with ``torch.compile`` before the engine is built.

As torchtitan's ``apply_compile``: one compile per block, the multi-token-prediction depths' blocks included (the
blocks share their code, so the graphs are reused across layers of a kind), applied to the outermost module of each
block, after any wrapping (activation recomputation included), in place (``nn.Module.compile``: parameter names and
checkpoints are unchanged). Where a shape depends on the data (MoE routing counts), dynamo breaks the graph and
compiles the pieces around it; the first step with new sizes marks them dynamic, so steps after that reuse the
compiled code instead of recompiling.
"""
from __future__ import annotations

import torch
from torch import nn

from sparselm.errors import ConfigError

BACKEND = "inductor"


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The outermost module of every transformer block this rank holds: the entries of ``layers`` (the
    one-process model and its tensor/expert-parallel forms) or the block stages of a pipeline, then the block
    of each multi-token-prediction depth (``model.mtp_layers``; under a pipeline, where this rank holds the
    head stage)."""
    layers = getattr(module, "layers", None)
    if isinstance(layers, nn.ModuleList):
        return list(layers) + [depth.block for depth in (getattr(module, "mtp", None) or [])]
    stages = getattr(module, "block_stages", None)
    if callable(stages):
        head = module.head_stage()
        return list(stages()) + [block for _, block in (head.mtp_blocks() if head is not None else [])]
    raise ValueError(f"train.compile: no transformer blocks found in {type(module).__name__}")


def compile_blocks(module: nn.Module, backend: str | None = None) -> int:
    """Compile every block of ``module`` in place (``backend``: BACKEND unless given); returns how many."""
    blocks = block_modules(module)
    for block in blocks:
        block.compile(backend=backend or BACKEND)
    return len(blocks)


def check_compiler(device: torch.device, backend: str | None = None) -> None:
    """Compile and run a two-op function on ``device``: raises ConfigError (one line naming train.compile)
    when this torch has no working compiler backend there (no C++ compiler for inductor on CPU, no Triton
    for it on a GPU, a torch built without dynamo...)."""
    backend = backend or BACKEND
    try:
        fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend=backend, fullgraph=True)
        x = torch.ones(4, device=device)
        torch.testing.assert_close(fn(x), torch.sin(x) * 2 + 1)
    except Exception as err:  # noqa: BLE001 - any failure means the setting cannot work here
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise ConfigError(f"train.compile=true but torch.compile ({backend}) does not work on {device.type} with this "
                          f"torch ({torch.__version__}): {type(err).__name__}: {reason}; set train.compile=false") from None
