"""tools/bench_attention.py runs in-process on CPU and reports a timing and a ratio for every length."""
import math

from tools.bench_attention import main


def test_bench_runs_on_cpu(capsys):
    rows = main(["--lengths", "256,384", "--window", "64", "--heads", "1", "--head-dim", "16", "--repeats", "1",
                 "--warmup", "0", "--device", "cpu", "--with-reference", "--reference-max-len", "256"])
    assert [r["seq"] for r in rows] == [256, 384]
    assert all(r["ratio"] > 0 and r["dense causal SDPA"] > 0 for r in rows)
    assert rows[0]["sliding window (masked SDPA)"] > 0 and math.isnan(rows[1]["sliding window (masked SDPA)"])
    assert "| 384 |" in capsys.readouterr().out
