"""The planner's stated assumptions: the hardware and runtime figures its estimates take, each settable from
the command line (``--name value``) and printed with every plan."""
from __future__ import annotations

from dataclasses import dataclass

GiB = 1024**3
"""Bytes in a GiB (2^30): the unit every memory figure of the planner prints in."""


@dataclass
class Assumptions:
    """Hardware and runtime figures of the estimates (defaults: an H100 SXM node of 8 GPUs)."""

    peak_tflops: float = 989.0
    """Peak dense matmul TFLOP/s of one GPU at the run's precision (H100 SXM bf16: 989)."""
    mfu: float = 0.40
    """Fraction of peak the model's matmuls reach (model FLOPs utilisation)."""
    nvlink_gbs: float = 450.0
    """GB/s one GPU sends to the others of its node (H100 NVLink 4: 450 each way)."""
    network_gbs: float = 50.0
    """GB/s one GPU sends to other nodes (one 400 Gb/s NIC per GPU)."""
    pcie_gbs: float = 25.0
    """GB/s between one GPU and host memory (offload)."""
    cpu_adam_gparams_s: float = 1.0
    """Billions of parameters one rank's CPU Adam (DeepSpeedCPUAdam) updates per second under offload."""
    gpus_per_node: int = 8
    """GPUs per node: decides which groups communicate over NVLink and which over the network."""
    gpu_runtime_gb: float = 2.5
    """GPU memory besides tensors: CUDA context, NCCL buffers, allocator fragmentation (GiB)."""
    host_process_gb: float = 0.4
    """Host memory of one rank before the model: imports, process groups, data (GiB; tools/bench_memory.py
    measured 0.39 on the project's CPU machine)."""
    overlap_dp: float = 0.0
    """Fraction of the data-parallel gradient communication hidden behind backward compute (0: none)."""
