"""Context parallelism (parallel.cp, Ulysses): activation memory per rank and step time at cp 1, 2, 4.

    python tools/bench_cp.py --cp 1,2,4 --lengths 1024,2048,4096 --budget-gb 1.5

Each degree is a real gloo world of cp CPU processes (spawned here) running the trainer's construction
(``Topology``, ``parallelize``) of a tiny model (``--config``, default tiny_dense with a vocabulary of 256, plus
any ``--section.key=value`` overrides) and forward + backward steps of one sequence of each length.  Every rank reports, at each length:
- ``saved_gb``: activation bytes autograd keeps from forward to backward at once (``saved_tensors_hooks``,
  parameters excluded, each storage once): what the sequence length costs the rank;
- ``step_peak_above_gb``: a step's peak RSS above the RSS it started from (``/proc/self/status`` VmHWM, reset
  through ``/proc/self/clear_refs``);
- ``step_s``: median seconds of a forward + backward after a warm-up one.
The table gives ratios against cp1 at the same length, measured in the same run (on a machine with fewer
cores than cp x threads the ranks share cores: the times then say little).  Per degree, a least-squares
line of saved bytes against the length gives the longest sequence whose saved activations fit
``--budget-gb`` per rank, and the tokens each rank then holds.  The last line is one JSON object.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1024**3


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> None:
    """VmHWM back to the current RSS (Linux >= 4.0: '5' to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def _saved_bytes(model, run) -> int:
    """The most bytes autograd holds for backward while ``run()`` builds the graph (parameters excluded)."""
    import torch

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params:
                seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return sum(seen.values()), out


def _worker(rank: int, world: int, port: int, config: str, overrides: list[str], lengths: list[int], steps: int, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from sparselm.config import load_config
    from sparselm.model import build_model
    from sparselm.parallel import parallelize
    from sparselm.parallel.topology import Topology

    rows = []
    try:
        for length in lengths:
            cfg = load_config(config, overrides + [f"--data.seq_len={length}", f"--model.max_seq_len={length}",
                                                   f"--parallel.cp={world}", "--train.global_batch_size=1"])
            topo = Topology(cfg)
            try:
                model = parallelize(build_model(cfg), cfg, topo)
                g = torch.Generator().manual_seed(0)
                ids = torch.randint(0, cfg.model.vocab_size, (1, length + 1), generator=g)
                x, y = ids[:, :-1], ids[:, 1:]
                times, saved, above = [], 0, 0.0
                for step in range(steps + 1):
                    base = _status_kb("VmRSS")
                    _reset_peak()
                    dist.barrier()
                    start = time.perf_counter()
                    nbytes, out = _saved_bytes(model, lambda: model(x, y))
                    out.loss.backward()
                    model.zero_grad(set_to_none=True)
                    dist.barrier()
                    if step:  # the first step warms up
                        times.append(time.perf_counter() - start)
                        saved = max(saved, nbytes)
                        above = max(above, (_status_kb("VmHWM") - base) * 1024 / GB)
                rows.append({"cp": world, "rank": rank, "seq_len": length, "tokens_per_rank": length // world,
                             "saved_gb": saved / GB, "step_peak_above_gb": above, "step_s": statistics.median(times),
                             "loss": out.loss.item()})
            finally:
                topo.teardown()
        queue.put((rank, rows))
    except BaseException as err:  # noqa: BLE001 - reported to the parent
        queue.put((rank, f"{type(err).__name__}: {err}"))
    finally:
        dist.destroy_process_group()


def run_world(cp: int, config: str, overrides: list[str], lengths: list[int], steps: int) -> list[dict]:
    """Rank 0's rows of a world of ``cp`` processes (every rank of a cp group holds the same share)."""
    import torch.multiprocessing as mp

    from sparselm.training.runtime import free_port

    ctx = mp.get_context("spawn")
    queue, port = ctx.Queue(), free_port()
    procs = [ctx.Process(target=_worker, args=(r, cp, port, config, overrides, lengths, steps, queue)) for r in range(cp)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=3600) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    for rank, value in results.items():
        if isinstance(value, str):
            raise SystemExit(f"bench_cp: cp={cp} rank {rank} failed: {value}")
    return results[0]


def longest_fitting(rows: list[dict], budget_gb: float) -> tuple[int, int]:
    """(sequence length, tokens per rank) whose saved activations reach ``budget_gb`` on the least-squares
    line of saved bytes against length through ``rows`` (one degree)."""
    xs, ys = [r["seq_len"] for r in rows], [r["saved_gb"] for r in rows]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / max(sum((x - mx) ** 2 for x in xs), 1e-30)
    length = int((budget_gb - (my - slope * mx)) / slope) if slope > 0 else 0
    return length, length // rows[0]["cp"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="tiny_dense")
    parser.add_argument("--cp", default="1,2,4", help="context-parallel degrees, comma-separated (1 first: the baseline)")
    parser.add_argument("--lengths", default="1024,2048,4096", help="sequence lengths, comma-separated")
    parser.add_argument("--budget-gb", type=float, default=1.5, help="GiB of saved activations per rank")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after a warm-up one")
    args, overrides = parser.parse_known_args(argv)
    overrides = ["--model.vocab_size=256", *overrides]  # the byte tokenizer's size; later overrides win
    degrees = [int(c) for c in args.cp.split(",")]
    lengths = [int(n) for n in args.lengths.split(",")]
    if degrees[0] != 1:
        parser.error("--cp must start with 1 (the baseline of the ratios)")
    rows = {cp: run_world(cp, args.config, overrides, lengths, args.steps) for cp in degrees}
    base = {r["seq_len"]: r for r in rows[1]}
    print(f"{'cp':>3} {'seq_len':>8} {'tokens/rank':>11} {'saved GiB':>9} {'x cp1':>6} {'peak+ GiB':>9} {'step s':>7} {'x cp1':>6}")
    for cp in degrees:
        for r in rows[cp]:
            b = base[r["seq_len"]]
            print(f"{cp:>3} {r['seq_len']:>8} {r['tokens_per_rank']:>11} {r['saved_gb']:>9.3f} "
                  f"{r['saved_gb'] / b['saved_gb']:>6.2f} {r['step_peak_above_gb']:>9.3f} {r['step_s']:>7.3f} "
                  f"{r['step_s'] / b['step_s']:>6.2f}")
    fits = {}
    for cp in degrees:
        length, tokens = longest_fitting(rows[cp], args.budget_gb)
        fits[cp] = {"max_seq_len": length, "tokens_per_rank": tokens}
        print(f"cp={cp}: saved activations reach {args.budget_gb:g} GiB per rank at seq_len ~{length} "
              f"({tokens} tokens per rank; {length / max(fits[1]['max_seq_len'], 1):.2f}x cp1)")
    result = {"config": args.config, "overrides": overrides, "budget_gb": args.budget_gb, "rows": rows, "fits": fits}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
