"""Benchmark: forward+backward time and peak memory of our PKM layer against (a) the dense SwiGLU FFN of
the same width (d_ff = 4 d) and (b) the PyPI ``product-key-memory`` package at the same settings.

    python tools/bench_pkm.py [--d-model 256 --tokens 2048 --heads 4 --k-dim 128 --knn 32 --n-keys 65536]

Peak memory is what one step allocates beyond the module and its input (activations, saved tensors,
gradients): ``torch.cuda.max_memory_allocated`` on a GPU; on CPU a dispatch-mode tracker that adds up
the tensor storages alive at each op (a separate run, so it does not slow the timed one).
Targets (issue 4): with >= 10x the FFN's parameters, time <= 1.5x the FFN's; faster than PyPI's.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
import weakref

import sparselm  # noqa: F401 - before torch allocates: its CPU allocator setting (sparselm/__init__.py)
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _strided(t) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


class PeakMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive (CPU stand-in for max_memory_allocated)."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = self.peak = 0

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if _strided(t)}
        for t in tree_flatten(out)[0]:
            if _strided(t):  # a sparse tensor's pieces are strided tensors, counted where they are made
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live and key not in inputs:  # views are not allocations
                    self.live[key] = storage.nbytes()
                    self.current += storage.nbytes()
                    weakref.finalize(storage, self._free, key)
        self.peak = max(self.peak, self.current)
        return out


def build(args, device, dtype):
    from product_key_memory import PKM as PyPIPKM

    from sparselm.model.feedforward import SwiGLU
    from sparselm.model.pkm import PKMConfig, ProductKeyMemory

    d = args.d_model
    pcfg = PKMConfig(n_keys=args.n_keys, heads=args.heads, knn=args.knn, k_dim=args.k_dim)
    n_sub = pcfg.n_sub
    layers = {
        "ffn": SwiGLU(d, 4 * d),
        "pkm": ProductKeyMemory(d, pcfg),
        # Same sizes: its dim_head is the width of one query half; its LayerNorm is per half.
        "pypi": PyPIPKM(d, heads=args.heads, num_keys=n_sub, topk=args.knn, dim_head=args.k_dim // 2),
    }
    return {k: m.to(device, dtype).train() for k, m in layers.items()}


def step(module, x):
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).sum().backward()


def time_steps(layers: dict, x, iters: int, warmup: int, device) -> dict[str, float]:
    """Median seconds per fwd+bwd step of each layer.  The layers take turns within every iteration, so
    load from other processes on a shared machine affects them alike."""
    times: dict[str, list[float]] = {name: [] for name in layers}
    for it in range(warmup + iters):
        for name, module in layers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            step(module, x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            if it >= warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def peak_bytes(module, x, device) -> int:
    step(module, x)  # warm caches so one-off allocations are not counted
    module.zero_grad(set_to_none=True)
    x.grad = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(module, x)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    with PeakMemory() as tracker:
        step(module, x)
    return tracker.peak


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch x sequence)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--k-dim", type=int, default=128, help="query width per head (two halves); d_model/2 as in Lample 2019")
    p.add_argument("--knn", type=int, default=32)
    p.add_argument("--n-keys", type=int, default=65536, help="memory slots (a perfect square)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse(argv)
    torch.manual_seed(args.seed)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    layers = build(args, device, dtype)
    batch = max(1, args.tokens // args.seq_len)
    x = torch.randn(batch, args.seq_len, args.d_model, device=device, dtype=dtype, requires_grad=True)
    seconds = time_steps(layers, x, args.iters, args.warmup, device)
    results = {name: {"params": sum(p.numel() for p in module.parameters()), "time_ms": 1000 * seconds[name],
                      "peak_mb": peak_bytes(module, x, device) / 2 ** 20}
               for name, module in layers.items()}
    ffn, pkm, pypi = results["ffn"], results["pkm"], results["pypi"]
    ratios = {
        "params_pkm_over_ffn": pkm["params"] / ffn["params"],
        "time_pkm_over_ffn": pkm["time_ms"] / ffn["time_ms"],
        "time_pkm_over_pypi": pkm["time_ms"] / pypi["time_ms"],
        "mem_pkm_over_ffn": pkm["peak_mb"] / ffn["peak_mb"],
        "mem_pkm_over_pypi": pkm["peak_mb"] / pypi["peak_mb"],
    }
    threads = torch.get_num_threads() if device.type == "cpu" else "-"
    load = " | load average %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    thp = f" | THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')}" if device.type == "cpu" else ""
    print(f"device {device} ({threads} threads{load}{thp}) | {args.dtype} | {batch} x {args.seq_len} tokens | d_model {args.d_model} | "
          f"PKM heads {args.heads} k_dim {args.k_dim} knn {args.knn} n_keys {args.n_keys}")
    print(f"{'layer':<6}{'params':>14}{'fwd+bwd ms':>13}{'peak MB':>11}")
    for name, r in results.items():
        print(f"{name:<6}{r['params']:>14,}{r['time_ms']:>13.2f}{r['peak_mb']:>11.1f}")
    for key, value in ratios.items():
        print(f"{key:<22}{value:8.2f}")
    time_ok = ratios["params_pkm_over_ffn"] >= 10 and ratios["time_pkm_over_ffn"] <= 1.5
    print(f"target >=10x FFN params at <=1.5x FFN time: {'met' if time_ok else 'NOT met'}; "
          f"faster than PyPI: {'yes' if ratios['time_pkm_over_pypi'] < 1 else 'NO'}")
    return {"layers": results, "ratios": ratios}


if __name__ == "__main__":
    main()
