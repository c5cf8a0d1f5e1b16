"""The PKM benchmark tool: its memory tracker measures what is allocated, and a tiny run reports all layers."""
import sys

import pytest
import torch

from support.run import REPO

sys.path.insert(0, str(REPO / "tools"))
import bench_pkm  # noqa: E402


def test_peak_memory_tracker_counts_live_tensors_only():
    a = torch.randn(256, 256)  # 256 KiB, made before tracking: not counted, nor are views of it
    with bench_pkm.PeakMemory() as tracker:
        view = a.t()
        b = a @ a  # +256 KiB
        c = b.relu()  # +256 KiB: peak 512 KiB
        del b, c
        d = torch.empty(3 * 256 * 256)  # 768 KiB alone: the new peak
        del d, view
    assert tracker.peak == 3 * 256 * 256 * 4
    assert tracker.current == 0


def test_tiny_benchmark_reports_every_layer():
    out = bench_pkm.main(["--d-model=32", "--tokens=64", "--seq-len=16", "--heads=2", "--k-dim=16", "--knn=4",
                          "--n-keys=256", "--iters=1", "--warmup=0", "--device=cpu"])
    layers = out["layers"]
    assert layers["ffn"]["params"] == 3 * 32 * 128
    assert layers["pkm"]["params"] > 256 * 32 and layers["pypi"]["params"] > 256 * 32
    assert all(r["time_ms"] > 0 and r["peak_mb"] > 0 for r in layers.values())
    assert out["ratios"]["params_pkm_over_ffn"] == pytest.approx(layers["pkm"]["params"] / (3 * 32 * 128))
