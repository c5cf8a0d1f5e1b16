"""Plain-PyTorch model code. No torch.distributed, deepspeed or megatron imports here:
parallel versions of these modules are swapped in by sparselm.parallel."""
from sparselm.model.transformer import LossOutput, SparseLM, build_model

__all__ = ["SparseLM", "LossOutput", "build_model"]
