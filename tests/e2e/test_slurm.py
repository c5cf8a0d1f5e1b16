"""Runs that survive a real cluster, as a user launches them: the sbatch scripts on a real one-node SLURM
cluster (started here, see local_slurm.py), a time limit that preempts a job which then requeues itself
and continues, and two-"node" launches on 127.0.0.1 (torchrun agents, deepspeed --no_ssh launchers).

Every run is compared with one plain process.  The learning rate is constant after a short warmup
(min_lr_ratio=1), so the losses of a short run are the first steps of the long reference run, which is
trained once for the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from support.run import BIN, PYTHON, REPO, TINY, subprocess_env
from sparselm.training.metrics import read_metrics
from support.local_slurm import LocalSlurm, missing_binaries
from sparselm.training.runtime import free_port

SHORT, LONG = 12, 2500  # LONG: long enough that a 1-minute job is signalled before it ends (~30 s on 2 cores)
ARGS = TINY + ["--optim.warmup_steps=5", "--optim.min_lr_ratio=1", "--data.allow_repeat=true"]


class Reference:
    """One plain process, LONG steps, trained in the background (one thread): the losses every other run must
    reproduce.  It runs beside the cluster's start and the time-limit job, which leave a core idle; a test
    reads the steps it needs as soon as they are logged."""

    def __init__(self, out):
        self.out, self.log = out, out.parent / "reference.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "sparselm.train", *ARGS, f"--train.steps={LONG}",
                                          f"--train.out_dir={out}"], cwd=REPO, env=subprocess_env(),
                                         stdout=log, stderr=subprocess.STDOUT)

    def rows(self, steps: int = LONG, timeout: float = 600) -> list[dict]:
        end = time.monotonic() + timeout
        while True:
            done = self.proc.poll() is not None
            metrics = self.out / "metrics.jsonl"
            text = metrics.read_text() if metrics.exists() else ""
            rows = [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith("\n")]
            if len(rows) >= steps:
                return rows[:steps]
            assert not done, f"the reference run exited {self.proc.returncode} after {len(rows)} steps:\n" \
                             f"{self.log.read_text()[-4000:]}"
            assert time.monotonic() < end, f"the reference run logged {len(rows)} of {steps} steps in {timeout} s"
            time.sleep(0.5)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run")
    yield ref
    ref.proc.kill()
    ref.proc.wait()


def assert_same_losses(run: list[dict], reference: Reference, steps: int) -> None:
    assert [r["step"] for r in run] == list(range(1, steps + 1)), "one metrics line per step"
    for got, want in zip(run, reference.rows(steps)):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5), got["step"]


# ------------------------------------------------------------------------------------------ SLURM
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"SLURM is not installed here (missing {', '.join(missing)}): run slurm/install_local_cluster.sh as root")
    if os.geteuid() != 0:
        pytest.skip("a local SLURM cluster needs root (slurmd runs jobs as their user)")
    with LocalSlurm(tmp_path_factory.mktemp("slurm")) as c:
        yield c


def submit(cluster, tmp_path, script: str, sbatch_args: list[str], train_args: list[str], env=None) -> tuple[int, object]:
    log = tmp_path / "job.out"
    job = cluster.sbatch([*sbatch_args, f"--output={log}", f"slurm/{script}", *train_args],
                         env={"OMP_NUM_THREADS": "1", **(env or {})}, cwd=REPO)
    return job, log


def test_time_limit_saves_requeues_and_continues(reference, cluster, tmp_path):
    """A 1-minute job (train.sbatch) gets SIGUSR1 before its limit, saves, exits 75, requeues itself and,
    resumed, reaches the uninterrupted run's final loss with one metrics line per step.  One rank, as the
    reference: over thousands of steps another data-parallel layout drifts by rounding (about 1e-3 after
    50 steps for 2 ranks), which would hide what this test checks, an exact resume."""
    out = tmp_path / "run"
    job, log = submit(cluster, tmp_path, "train.sbatch", ["--time=1", "--signal=B:USR1@59", "--ntasks-per-node=1"],
                      ARGS + [f"--train.steps={LONG}", f"--train.out_dir={out}"])
    end = time.monotonic() + 180
    while cluster.job(job).get("Restarts", "0") == "0":
        state = cluster.job(job).get("JobState")
        assert state not in ("COMPLETED", "FAILED", "TIMEOUT", "CANCELLED"), \
            f"job ended ({state}) without being requeued:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < end, log.read_text()[-4000:]
        time.sleep(1)
    # The next attempt has the same 1-minute limit and would be signalled again (and requeue again): give
    # it room so that the test ends after one requeue.
    cluster.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"])
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "got SIGUSR1" in text and "requeueing" in text and "attempt 2" in text, text[-4000:]
    stopped = [line for line in text.splitlines() if line.startswith("sparselm: stopped at step")]
    assert len(stopped) == 1, text[-4000:]
    first = int(stopped[0].split("step ")[1].split("/")[0])
    assert 0 < first < LONG
    assert f"resumed from {out / 'checkpoints' / f'step_{first}'} at step {first}" in text
    run = read_metrics(out)
    assert [r["step"] for r in run] == list(range(1, LONG + 1)), "one metrics line per step after the requeue"
    want = reference.rows(LONG)
    assert run[first]["loss"] == pytest.approx(want[first]["loss"], rel=1e-6)  # the first resumed step
    assert run[-1]["loss"] == pytest.approx(want[-1]["loss"], rel=1e-6)


def test_deepspeed_sbatch_two_ranks_equals_one_process(cluster, reference, tmp_path):
    """slurm/train_deepspeed.sbatch, run from slurmd's spool copy, 2 ranks through the deepspeed launcher."""
    out = tmp_path / "run"
    job, log = submit(cluster, tmp_path, "train_deepspeed.sbatch", [],
                      ARGS + [f"--train.steps={SHORT}", f"--train.out_dir={out}"], env={"PROCS_PER_NODE": "2"})
    info = cluster.wait(job)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED", text[-4000:]
    assert "2 process(es)" in text
    assert_same_losses(read_metrics(out), reference, SHORT)


# ------------------------------------------------------------------------------------- two nodes
def _run_nodes(cmds: list[list[str]], timeout: int = 300) -> None:
    procs = [subprocess.Popen(c, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for c in cmds]
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for p, o in zip(procs, outs):
        assert p.returncode == 0, f"{' '.join(p.args)} exited {p.returncode}\n{o[-4000:]}"


def test_two_torchrun_nodes_equal_one_process(reference, tmp_path):
    port, out = free_port(), tmp_path / "run"
    _run_nodes([[str(BIN / "torchrun"), "--nnodes=2", f"--node_rank={i}", "--nproc_per_node=1", "--rdzv_backend=c10d",
                 f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", "-m", "sparselm.train",
                 *ARGS, f"--train.steps={SHORT}", f"--train.out_dir={out}"] for i in range(2)])
    assert_same_losses(read_metrics(out), reference, SHORT)


def test_two_deepspeed_no_ssh_nodes_equal_one_process(reference, tmp_path):
    hostfile, out, port = tmp_path / "hostfile", tmp_path / "run", free_port()
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    _run_nodes([[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", f"--node_rank={i}",
                 "--master_addr=127.0.0.1", f"--master_port={port}", "--module", "sparselm.train",
                 *ARGS, f"--train.steps={SHORT}", f"--train.out_dir={out}"] for i in range(2)])
    assert_same_losses(read_metrics(out), reference, SHORT)
