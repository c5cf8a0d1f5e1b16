#!/usr/bin/env python
"""Background prefetch against reading each batch on the training thread, with a slowed reader.

  python tools/bench_prefetch.py [--delay-ms 40] [--steps 20] [--config tiny_dense] [--section.key=value ...]

Every batch read sleeps ``--delay-ms`` (a cold or network filesystem), then the same run trains twice in
this process, with data.prefetch=0 and =2; the wall time per step of each, their ratio and how much of
the delay prefetch hid are printed, and, as the last line, one JSON object
{"delay_ms", "step_s": {"sync": s, "prefetch": s}, "ratio", "hidden_frac"}.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time


def run(overrides: list[str], prefetch: int, out_dir: str, steps: int) -> float:
    from sparselm.training.launch import prepare, start

    trainer = start(prepare(overrides[0], overrides[1:] + [f"--data.prefetch={prefetch}", f"--train.steps={steps}",
                                                           f"--train.out_dir={out_dir}", "--train.eval_every=0",
                                                           "--train.progress=false", "--train.tensorboard=false",
                                                           "--train.save_every=0"]))
    trainer.save = lambda: "nothing (benchmark)"  # time the loop, not the final checkpoint
    started = time.perf_counter()
    trainer.run()
    elapsed = time.perf_counter() - started
    trainer.close()
    return elapsed / steps


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay-ms", type=float, default=40.0, help="sleep added to every batch read")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--config", default="tiny_dense")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two readers this often; best of each")
    args, overrides = parser.parse_known_args(argv)

    from sparselm.data.packing import PackedSamples
    from sparselm.training.runtime import quiet_third_party

    quiet_third_party()
    original = PackedSamples.batch

    def slow_batch(self, indices):
        time.sleep(args.delay_ms / 1000)
        return original(self, indices)

    PackedSamples.batch = slow_batch
    step_s = {"sync": float("inf"), "prefetch": float("inf")}
    with tempfile.TemporaryDirectory() as tmp:
        run([args.config, *overrides], 0, f"{tmp}/warm", 3)  # imports, corpus cache, first-step costs
        for r in range(args.repeats):  # alternated, best of each: this machine's load varies
            for name, prefetch in (("sync", 0), ("prefetch", 2)):
                step_s[name] = min(step_s[name], run([args.config, *overrides], prefetch, f"{tmp}/{name}{r}", args.steps))
    delay = args.delay_ms / 1000
    result = {"delay_ms": args.delay_ms, "step_s": step_s, "ratio": step_s["prefetch"] / step_s["sync"],
              "hidden_frac": min(1.0, max(0.0, (step_s["sync"] - step_s["prefetch"]) / delay))}
    print(f"{'reader':10s} {'s/step':>8s}")
    for name, s in step_s.items():
        print(f"{name:10s} {s:8.4f}")
    print(f"prefetch/sync {result['ratio']:.3f}; {100 * result['hidden_frac']:.0f}% of the {args.delay_ms:g} ms read hidden")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
