"""Forward+backward time of one MoE layer, side by side with
(a) a dense SwiGLU FFN with the same active FLOPs per token (hidden = top_k * expert_hidden), and
(b) ``deepspeed.moe.layer.MoE`` with the same experts (SwiGLU modules), k and tokens.

Both MoE layers run dropless by default (DeepSpeed ``drop_tokens=False``); ``--capacity-factor F`` runs
both with token dropping at that capacity.  Prints one row per expert count and the two ratios.

    python tools/bench_moe.py --experts 8,16,32 --tokens 4096 --d-model 256 --expert-hidden 512
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def _init_process_group() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        from sparselm.training.runtime import free_port

        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", rank=0, world_size=1)
    from sparselm.parallel.topology import ensure_deepspeed_comm

    ensure_deepspeed_comm()


def _time(fns: dict, warmup: int, repeats: int, device: torch.device, clock) -> dict:
    """Median seconds of each fn() over repeats, after warmup calls; the candidates are interleaved so that
    a change in machine load hits all of them alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(clock() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def _step(module, x, returns_aux: bool):
    def run():
        out = module(x)
        y = out[0] if isinstance(out, tuple) else out
        loss = y.float().square().mean()
        if returns_aux:
            loss = loss + out[1]
        loss.backward()
        for p in module.parameters():
            p.grad = None
        x.grad = None
    return run


def build_layers(experts: int, args, device, dtype):
    from deepspeed.moe.layer import MoE

    from sparselm.model.feedforward import SwiGLU
    from sparselm.model.moe import MoELayer

    d, h, k = args.d_model, args.expert_hidden, args.top_k
    drop = args.capacity_factor > 0
    torch.manual_seed(0)
    ours = MoELayer(d, experts, k, h, renormalize=k > 1, drop_tokens=drop,
                    capacity_factor=args.capacity_factor if drop else 1.0, expert_impl=args.impl)
    for m in ours.modules():
        if m is not ours and hasattr(m, "reset_parameters"):
            m.reset_parameters()
    dense = SwiGLU(d, k * h)
    ds = MoE(d, SwiGLU(d, h), num_experts=experts, ep_size=1, k=k, drop_tokens=drop,
             capacity_factor=args.capacity_factor if drop else 1.0, eval_capacity_factor=1.0, min_capacity=0,
             use_rts=False, noisy_gate_policy=None, top2_2nd_expert_sampling=False)
    ds.set_deepspeed_parallelism()
    with torch.no_grad():  # identical weights: DeepSpeed computes the same function when dropless
        ds.deepspeed_moe.gate.wg.weight.copy_(ours.router.weight)
        for e, expert in enumerate(ds.deepspeed_moe.experts.deepspeed_experts):
            expert.gate_proj.weight.copy_(ours.experts.gate_up_proj[e, :h])
            expert.up_proj.weight.copy_(ours.experts.gate_up_proj[e, h:])
            expert.down_proj.weight.copy_(ours.experts.down_proj[e])
    return [m.to(device=device, dtype=dtype) for m in (ours, dense, ds)]


def describe_machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}")


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--experts", default="8,16,32", help="comma-separated expert counts")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per forward (batch x sequence)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--expert-hidden", type=int, default=512)
    p.add_argument("--capacity-factor", type=float, default=0.0, help="> 0: both MoE layers drop over this capacity")
    p.add_argument("--impl", default="auto", choices=["auto", "grouped_mm", "padded"], help="our expert kernel")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps the default")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="wall time, or this process's CPU time (with --threads 1: robust to other load on the machine)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.clock == "process" and device.type != "cpu":
        p.error("--clock process measures CPU time; use it with --device cpu")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    _init_process_group()

    mode = f"capacity factor {args.capacity_factor}" if args.capacity_factor > 0 else "dropless"
    print(f"# {describe_machine(device)}; {args.dtype}; tokens {args.tokens}, d_model {args.d_model}, "
          f"expert hidden {args.expert_hidden}, top-{args.top_k}, {mode}; fwd+bwd, median of {args.repeats}, "
          f"{args.clock} clock; load average {os.getloadavg()[0]:.1f}")
    print(f"{'experts':>7} | {'sparselm ms':>11} | {'dense ms':>8} | {'deepspeed ms':>12} | "
          f"{'sparselm/dense':>14} | {'deepspeed/sparselm':>18}")
    rows = []
    for experts in [int(e) for e in args.experts.split(",")]:
        ours, dense, ds = build_layers(experts, args, device, dtype)
        x = torch.randn(args.tokens // 8, 8, args.d_model, device=device, dtype=dtype, requires_grad=True)
        if args.capacity_factor <= 0:  # dropless: both must compute the same function
            with torch.no_grad():
                same = (ours(x)[0] - ds(x)[0]).abs().max().item()
        t = _time({"ours": _step(ours, x, True), "dense": _step(dense, x, False), "ds": _step(ds, x, True)},
                  args.warmup, args.repeats, device, clock)
        t_ours, t_dense, t_ds = t["ours"], t["dense"], t["ds"]
        row = {"experts": experts, "sparselm_ms": 1e3 * t_ours, "dense_ms": 1e3 * t_dense, "deepspeed_ms": 1e3 * t_ds,
               "moe_over_dense": t_ours / t_dense, "deepspeed_over_sparselm": t_ds / t_ours}
        if args.capacity_factor <= 0:
            row["max_abs_diff_vs_deepspeed"] = same
        rows.append(row)
        print(f"{experts:>7} | {row['sparselm_ms']:>11.1f} | {row['dense_ms']:>8.1f} | {row['deepspeed_ms']:>12.1f} | "
              f"{row['moe_over_dense']:>14.2f} | {row['deepspeed_over_sparselm']:>18.2f}")
    return rows


if __name__ == "__main__":
    main()
