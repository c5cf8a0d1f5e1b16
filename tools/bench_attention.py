"""Forward+backward time of sliding-window attention against dense causal SDPA, per sequence length.

    python tools/bench_attention.py [--lengths 1024,4096,16384] [--window 256] [--device auto]

On CUDA the sparse side is compiled FlexAttention and the dense side SDPA's flash kernel (bf16).
On CPU the sparse side is the exact block-sparse path (only the key blocks a query block can see);
``--with-reference`` also times the masked-SDPA reference, which costs as much as dense attention.
Prints one markdown row per length with the dense/sparse ratio (higher is better for sparse).
``--sinks`` also times both with learned attention sinks (``model.attention_sinks``: an extra key and query
channel on SDPA and the block-sparse path, the log-sum-exp rescale on FlexAttention) and prints each one's
cost relative to the same path without sinks.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from sparselm.model.sinks import causal_with_sinks
from sparselm.model.sparse_attention.config import AttentionConfig
from sparselm.model.sparse_attention.kernels import sparse_attention
from sparselm.model.sparse_attention.patterns import PatternSpec


def time_fwd_bwd(fn, q, k, v, repeats: int, warmup: int) -> float:
    """Median seconds of forward + backward; on CUDA measured between synchronisations."""
    grad = torch.randn_like(q)
    times = []
    for i in range(warmup + repeats):
        for x in (q, k, v):
            x.grad = None
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        start = time.perf_counter()
        fn(q, k, v).backward(grad)
        if q.is_cuda:
            torch.cuda.synchronize(q.device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def dense_causal(q, k, v):
    ctx = contextlib.nullcontext()
    if q.is_cuda:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        ctx = sdpa_kernel(SDPBackend.FLASH_ATTENTION)
    with ctx:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", default="1024,4096,16384", help="comma-separated sequence lengths")
    ap.add_argument("--window", type=int, default=256, help="sliding-window size in tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    ap.add_argument("--dtype", default="auto", help="auto (bf16 on cuda, fp32 on cpu), fp32, bf16, fp16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--with-reference", action="store_true", help="also time the masked-SDPA reference path")
    ap.add_argument("--reference-max-len", type=int, default=4096, help="skip the reference above this length (its mask is T x T)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 keeps torch's default)")
    ap.add_argument("--sinks", action="store_true", help="also time both paths with learned attention sinks")
    args = ap.parse_args(argv)

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    dtype = dtypes[args.dtype] if args.dtype != "auto" else torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = PatternSpec.from_config(AttentionConfig(pattern="sliding_window", window=args.window))
    sparse_backend = "flex" if device.type == "cuda" else "block_sparse"
    paths = {"dense causal SDPA": dense_causal,
             f"sliding window ({sparse_backend})": lambda q, k, v: sparse_attention(q, k, v, spec, None, sparse_backend)}
    if args.with_reference:
        paths["sliding window (masked SDPA)"] = lambda q, k, v: sparse_attention(q, k, v, spec, None, "reference")
    if args.sinks:
        sinks = torch.zeros(args.heads, device=device, dtype=torch.float32, requires_grad=True)
        paths["dense causal SDPA + sinks"] = lambda q, k, v: causal_with_sinks(q, k, v, sinks, args.head_dim**-0.5, False)
        paths[f"sliding window ({sparse_backend}) + sinks"] = (
            lambda q, k, v: sparse_attention(q, k, v, spec, None, sparse_backend, sinks=sinks))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"# fwd+bwd, batch {args.batch}, {args.heads} heads x {args.head_dim}, {dtype}, window {args.window}, {name}")
    sink_cols = " | dense sinks / dense | sparse sinks / sparse" if args.sinks else ""
    print("| seq | " + " | ".join(f"{p} (ms)" for p in paths) + " | dense / sparse" + sink_cols + " |")
    print("|---" * (len(paths) + 2 + 2 * args.sinks) + "|")
    rows = []
    for t in (int(x) for x in args.lengths.split(",")):
        shape = (args.batch, args.heads, t, args.head_dim)
        q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        row = {"seq": t}
        for label, fn in paths.items():
            skip = "masked SDPA" in label and t > args.reference_max_len
            row[label] = float("nan") if skip else time_fwd_bwd(fn, q, k, v, args.repeats, args.warmup)
        sparse = row[f"sliding window ({sparse_backend})"]
        row["ratio"] = row["dense causal SDPA"] / sparse
        extra = ""
        if args.sinks:
            row["dense_sinks_cost"] = row["dense causal SDPA + sinks"] / row["dense causal SDPA"]
            row["sparse_sinks_cost"] = row[f"sliding window ({sparse_backend}) + sinks"] / sparse
            extra = f" | {row['dense_sinks_cost']:.2f}x | {row['sparse_sinks_cost']:.2f}x"
        rows.append(row)
        print(f"| {t} | " + " | ".join("-" if row[p] != row[p] else f"{row[p] * 1e3:.1f}" for p in paths)
              + f" | {row['ratio']:.2f}x{extra} |", flush=True)
    return rows


if __name__ == "__main__":
    main()
