"""Process start-up: torch.distributed for a plain process, torchrun or the deepspeed launcher."""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import datetime
import io
import os
import socket
import warnings

import torch
import torch.distributed as dist

from sparselm.errors import DistributedStartError, LoopbackAddressError
from sparselm.training.rendezvous import join


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Third-party start-up noise that says nothing to a sparselm user, printed once per process otherwise.
QUIET_WARNINGS = (
    "Transformer Engine and Apex are not installed",  # megatron-core, CPU or no apex: we do not use them
    "`torch.distributed.all_gather_into_tensor` is deprecated",  # called inside DeepSpeed's ZeRO
    "`torch.distributed.reduce_scatter_tensor` is deprecated",  # DeepSpeed's ZeRO-3, at every step
    "CUDA_DEVICE_MAX_CONNECTIONS",  # megatron-core's advice for GPU overlap, printed on CPU too
)


def quiet_third_party() -> None:
    """Filter known third-party start-up warnings; on a machine without CUDA, name DeepSpeed's CPU
    accelerator so that it does not warn that it fell back to it (call before importing DeepSpeed)."""
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def process_group_backend(cuda: bool) -> str:
    """gloo on CPU; on CUDA both: NCCL carries CUDA tensors, gloo the CPU tensors that some collectives
    use (metric averages, start-up agreement, checkpoint gathers), which an NCCL-only group rejects."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"


_SOLO: dict[str, str] = {}
"""The rendezvous variables ``init_distributed`` set itself for a plain process (a world of one)."""


def forget_solo_world() -> None:
    """Remove the rendezvous variables a world of one set (at teardown), so that a process that trains in-process
    and then launches others does not hand them its own, finished, rendezvous."""
    for key, value in _SOLO.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    _SOLO.clear()


def set_group_timeout(timeout_minutes: float) -> datetime.timedelta:
    """Make ``timeout_minutes`` the timeout of every process group created from now on without one of its own:
    DeepSpeed's expert groups, the pipeline's tied-weight groups, the checkpoint writer's gather group.  torch
    reads that default from ``torch.distributed.distributed_c10d``'s module globals (``default_pg_timeout``,
    ``default_pg_nccl_timeout``), 30 and 10 minutes otherwise, so a hung peer would stall those groups for
    half an hour whatever parallel.timeout_minutes says.  megatron-core's groups take the timeout as an
    argument (``Topology``)."""
    import torch.distributed.distributed_c10d as c10d

    timeout = datetime.timedelta(minutes=timeout_minutes)
    c10d.default_pg_timeout = timeout
    c10d.default_pg_nccl_timeout = timeout
    return timeout


def init_distributed(timeout_minutes: float = 30.0) -> torch.device:
    """Initialise the default process group and return this rank's device.

    A plain ``python -m sparselm.train`` becomes a world of one, so the same code path runs everywhere.
    ``timeout_minutes`` bounds every collective and the rendezvous, in the default group and in every group
    created later (``set_group_timeout``): a rank that waits longer raises instead of hanging.  Raises ``DistributedStartError`` naming MASTER_ADDR:MASTER_PORT when the
    rendezvous cannot complete, ``LoopbackAddressError`` when a node's name resolves to loopback (``meet``)."""
    quiet_third_party()
    import deepspeed

    if "RANK" not in os.environ:
        _SOLO.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port()))
        os.environ.update(_SOLO)
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local_rank)
    timeout = set_group_timeout(timeout_minutes)
    if not dist.is_initialized():
        backend = process_group_backend(cuda)
        try:
            join(backend, timeout)  # checks the hosts' addresses before gloo connects
        except LoopbackAddressError:
            raise
        except (RuntimeError, ValueError) as err:  # torch's DistStoreError / DistNetworkError are RuntimeErrors
            where = f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}"
            raise DistributedStartError(
                f"rank {os.environ['RANK']} of {os.environ.get('WORLD_SIZE')} could not join the process group at "
                f"{where} within parallel.timeout_minutes={timeout_minutes:g}: check that MASTER_ADDR is the first "
                f"node's reachable address, MASTER_PORT is free there, and every node was started "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):  # DeepSpeed prints "... shm_comm_op built successfully" per rank
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, timeout=timeout)
        for line in printed.getvalue().splitlines():
            if "built successfully" not in line:
                print(line)
    if cuda:
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the operating system (glibc's ``malloc_trim``; a no-op elsewhere).
    Reading a checkpoint allocates and frees many tensor-sized buffers, and glibc keeps the freed heap, so
    without this a resumed process would start training with a few hundred MB more RSS than a fresh one."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
