"""A peer lost in the middle of a run: its processes killed (a crashed node) or stopped (a hung one).

Two ranks started as srun starts them (RANK, WORLD_SIZE and MASTER_ADDR set, each its node's local rank 0), so
each survivor is on its own and must leave by itself: within about a minute, with one ``sparselm: error:`` line
and exit status 69, which the sbatch scripts requeue.  Before, a crash was a traceback and exit 1 and a hang lasted
30 minutes in the groups parallel.timeout_minutes did not reach.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from sparselm.training.metrics import read_metrics
from sparselm.training.runtime import free_port
from support.run import PYTHON, REPO, TINY, subprocess_env

LOST_EXIT = 69


def _start_pair(out, timeout_minutes: float) -> list[subprocess.Popen]:
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "sparselm.train", *TINY, "--train.steps=100000", "--train.save_every=0",
             f"--parallel.timeout_minutes={timeout_minutes}", f"--train.out_dir={out}"],
            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _wait_for_step(out, procs, step: int, limit: float = 240) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in procs):
            raise AssertionError(f"a rank ended early: {[p.communicate()[1][-2000:] for p in procs]}")
        rows = read_metrics(out, train_only=True)
        if rows and rows[-1]["step"] >= step:
            return
        time.sleep(0.2)
    raise AssertionError(f"no step {step} within {limit} s")


@pytest.mark.parametrize("fault, words", [(signal.SIGKILL, "lost its connection to"),
                                          (signal.SIGSTOP, "waited parallel.timeout_minutes=0.25")])
def test_the_survivor_of_a_lost_peer_exits_69_in_one_line(tmp_path, fault, words):
    procs = _start_pair(tmp_path / "run", timeout_minutes=0.25)
    try:
        _wait_for_step(tmp_path / "run", procs, 3)
        os.kill(procs[1].pid, fault)
        faulted = time.monotonic()
        _, err = procs[0].communicate(timeout=120)
        elapsed = time.monotonic() - faulted
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    errors = [line for line in err.splitlines() if line.startswith("sparselm: error:")]
    assert procs[0].returncode == LOST_EXIT, err[-3000:]
    assert len(errors) == 1 and words in errors[0] and "resume with --train.resume=latest" in errors[0], err[-3000:]
    assert "Traceback" not in err
    # a crash is seen at once; a hang after the timeout (15 s) plus the step in flight
    assert elapsed < (30 if fault == signal.SIGKILL else 75), elapsed


def test_bad_input_on_one_node_only_stops_every_node_at_once(tmp_path):
    """Rank 1 starts where the relative dataset path means nothing (another node's working directory): it says so
    on its node, rank 0 names the rank, host and file, and both exit 2 long before parallel.timeout_minutes."""
    from tools.preprocess_data import main as preprocess

    here, there = tmp_path / "node1", tmp_path / "node2"
    (here / "data").mkdir(parents=True)
    there.mkdir()
    (here / "doc.txt").write_text("a short document for two ranks. " * 400)
    preprocess(["--input", str(here / "doc.txt"), "--output-prefix", str(here / "data" / "small"), "--append-eod"])
    port = free_port()
    procs = []
    for rank, cwd in ((0, here), (1, there)):
        env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "sparselm.train", *TINY, "--train.steps=2", "--data.dataset=data/small",
             "--parallel.timeout_minutes=5", f"--train.out_dir={tmp_path / 'run'}"],
            cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    started = time.monotonic()
    outs = [p.communicate(timeout=180) for p in procs]
    elapsed = time.monotonic() - started
    lines = [[line for line in err.splitlines() if line.startswith("sparselm: error:")] for _, err in outs]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert len(lines[0]) == 1 and "rank 1 on " in lines[0][0] and "data/small" in lines[0][0], outs[0][1][-2000:]
    assert len(lines[1]) == 1 and "data/small" in lines[1][0], outs[1][1][-2000:]
    assert all("Traceback" not in err for _, err in outs)
    assert elapsed < 150, elapsed  # parallel.timeout_minutes=5: before, rank 0 waited all of it


def test_different_data_on_two_nodes_is_refused(tmp_path):
    """The same relative dataset path names other files on the second node: both stop at start-up (exit 2), rank 0
    naming the rank, its host and what differs, before a step trains on mismatched data."""
    from tools.preprocess_data import main as preprocess

    procs, port = [], free_port()
    for rank, words in ((0, "one corpus for rank zero. "), (1, "another, longer corpus for rank one! ")):
        cwd = tmp_path / f"node{rank + 1}"
        (cwd / "data").mkdir(parents=True)
        (cwd / "doc.txt").write_text(words * 400)
        preprocess(["--input", str(cwd / "doc.txt"), "--output-prefix", str(cwd / "data" / "small"), "--append-eod"])
    for rank in (0, 1):
        env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "PYTHONPATH": str(REPO)}
        procs.append(subprocess.Popen(
            [PYTHON, "-m", "sparselm.train", *TINY, "--train.steps=2", "--data.dataset=data/small",
             f"--train.out_dir={tmp_path / 'run'}"],
            cwd=tmp_path / f"node{rank + 1}", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=300) for p in procs]
    errors = [line for line in outs[0][1].splitlines() if line.startswith("sparselm: error:")]
    assert [p.returncode for p in procs] == [2, 2], outs
    assert len(errors) == 1 and "rank 1 on " in errors[0] and "opened other train data than rank 0" in errors[0], outs
    assert not (tmp_path / "run" / "checkpoints").exists()
