"""Plain-PyTorch model code. No torch.distributed, deepspeed or megatron imports here:
parallel versions of these modules are swapped in by sparselm.parallel.

Importing this package registers every block kind (``registry.BLOCKS``): dense here, the others by
their packages."""
from sparselm.model import moe, pkm, sparse_attention  # noqa: F401  each registers its block kinds
from sparselm.model.transformer import LossOutput, SparseLM, build_model

__all__ = ["SparseLM", "LossOutput", "build_model"]
