"""Run a function in N real processes joined by a gloo process group (for tests and tools).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, initialises
torch.distributed with gloo over a free localhost port, calls ``fn(rank, world_size, *args)`` in each
and returns the list of their return values (rank order).  An exception in any rank is re-raised here
with that rank's traceback.

Processes start from a ``forkserver`` that has imported torch, DeepSpeed, megatron-core and the trainer
once (``PRELOAD``): each rank is a fork of a process that has imported but never run anything, so it
builds its own distributed and model state as a spawned one would, without paying 4-7 s of imports per
rank (most of a small test world's time on a 2-core machine).  The parent's environment at the call is
applied in each rank, since a forkserver's children inherit the server's.
"""
from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from sparselm.training.runtime import free_port


# Imported once by the forkserver; a module missing here is imported by each rank on first use as before.
PRELOAD = ["torch", "torch.distributed", "deepspeed", "megatron.core", "sparselm.training.trainer", "sparselm.parallel"]


def _worker(rank, world_size, port, fn, args, queue, environ):
    import torch
    import torch.distributed as dist

    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, True, result))
    except BaseException:  # noqa: BLE001 - reported to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_distributed(fn, world_size: int, *args, timeout: float = 600):
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server starts (first call in this process)
    queue = ctx.Queue()
    port = free_port()
    environ = dict(os.environ)
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue, environ))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    errors = []
    try:
        for _ in range(world_size):
            rank, ok, value = queue.get(timeout=timeout)
            if ok:
                results[rank] = value
            else:
                errors.append(f"rank {rank} failed:\n{value}")
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else 60)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("\n".join(errors))
    return [results[r] for r in range(world_size)]
