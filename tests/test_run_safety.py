"""A run that goes wrong loses nothing: saved paths work from any directory, one run per out_dir."""
from __future__ import annotations

import json
import random

import yaml

from tests.conftest import PYTHON, TINY, read_metrics, run_cmd


def _corpus(directory, docs=300):
    """A byte-level indexed dataset ``directory/data/docs`` made by tools/preprocess_data.py."""
    from tools.preprocess_data import main

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "sparse", "expert", "memory", "token", "layer", "route"]
    (directory / "data").mkdir(parents=True)
    src = directory / "data" / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(40))}) + "\n"
                           for _ in range(docs)))
    main(["--input", str(src), "--output-prefix", str(directory / "data" / "docs"), "--append-eod"])


def test_saved_relative_paths_work_from_another_directory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _corpus(a)
    b.mkdir()
    run_cmd([PYTHON, "-m", "sparselm.train", *TINY, "--data.dataset=data/docs", "--train.steps=2",
             "--train.out_dir=run"], cwd=a)
    saved = yaml.safe_load((a / "run" / "config.yaml").read_text())
    assert saved["data"]["dataset"] == str(a / "data" / "docs")
    proc = run_cmd([PYTHON, "-m", "sparselm.evaluate", "--ckpt", str(a / "run"), "--batches", "1",
                    "--batch-size", "2"], cwd=b)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["loss"] > 0
    run_cmd([PYTHON, "-m", "sparselm.train", "--config", str(a / "run" / "config.yaml"), "--train.steps=3",
             "--train.resume=latest"], cwd=b)  # the saved out_dir is absolute: the same run continues
    assert [r["step"] for r in read_metrics(a / "run") if "loss" in r] == [1, 2, 3]
    assert not (b / "run").exists()
