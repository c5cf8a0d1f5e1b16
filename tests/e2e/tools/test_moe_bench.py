"""tools/bench_moe.py runs end to end on a tiny shape (in a spawned world of one for DeepSpeed's groups)."""
from pathlib import Path

from support.distributed import run_distributed

TOOLS = Path(__file__).resolve().parents[3] / "tools"


def _bench(rank, world_size):
    import sys

    sys.path.insert(0, str(TOOLS))
    from bench_moe import main

    return main(["--experts", "4,8", "--tokens", "64", "--d-model", "16", "--expert-hidden", "8",
                 "--warmup", "0", "--repeats", "1", "--clock", "process"])


def test_bench_moe_reports_both_ratios_on_the_same_function():
    (rows,) = run_distributed(_bench, 1)
    assert [r["experts"] for r in rows] == [4, 8]
    for r in rows:
        assert r["moe_over_dense"] > 0 and r["deepspeed_over_sparselm"] > 0
        assert r["max_abs_diff_vs_deepspeed"] < 1e-5
