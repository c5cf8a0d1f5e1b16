"""Process start-up: torch.distributed for a plain process, torchrun or the deepspeed launcher."""
from __future__ import annotations

import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Third-party start-up noise that says nothing to a sparselm user, printed once per process otherwise.
QUIET_WARNINGS = (
    "Transformer Engine and Apex are not installed",  # megatron-core, CPU or no apex: we do not use them
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # called inside DeepSpeed's ZeRO
    "CUDA_DEVICE_MAX_CONNECTIONS",  # megatron-core's advice for GPU overlap, printed on CPU too
)


def quiet_third_party() -> None:
    """Filter known third-party start-up warnings; on a machine without CUDA, name DeepSpeed's CPU
    accelerator so that it does not warn that it fell back to it (call before importing DeepSpeed)."""
    import warnings

    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def init_distributed() -> torch.device:
    """Initialise the default process group (gloo on CPU, nccl on GPU) and return this rank's device.

    A plain ``python -m sparselm.train`` becomes a world of one, so the same code path runs everywhere."""
    import contextlib
    import io

    quiet_third_party()
    import deepspeed
    import torch.distributed as dist

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # DeepSpeed prints "... shm_comm_op built successfully" per rank
            deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", auto_mpi_discovery=False)
        for line in printed.getvalue().splitlines():
            if "built successfully" not in line:
                print(line)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")

