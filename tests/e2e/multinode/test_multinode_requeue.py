"""Failures of a 2-node SLURM job on a 3-node namespace cluster (tools/local_cluster.py), each ending in a requeue
and a resume whose losses equal the uninterrupted one-process run's: a peer's ranks killed (the survivors exit 69,
slurm/train.sbatch requeues), a whole node lost (its link down and everything on it killed: the job comes back on
the two nodes left), and preemption (SIGUSR1 to the batch shell, as `--signal=B:USR1@SECONDS` sends it: every
rank stops after the same step, one checkpoint, exit 75, requeue).  Needs root, slurm-wlm and munge; skips
elsewhere with the reason.
"""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from sparselm.training.metrics import read_metrics
from support.local_slurm import missing_binaries
from support.multinode import assert_same_losses, bring_up, completed, rank_pids, submit_training, take_down
from tools.local_cluster import LocalCluster, missing_requirements

_why = missing_requirements() or (f"SLURM is not installed here (missing {', '.join(missing_binaries())})"
                                  if missing_binaries() else None)
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no local multi-node SLURM cluster: {_why}")

SAVE = ["--train.save_every=2", "--parallel.timeout_minutes=0.5"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    c = bring_up(LocalCluster(tmp_path_factory.mktemp("cluster"), nodes=3))
    failed = request.session.testsfailed
    yield c
    take_down(c, request, failed)


def submit(cluster, tmp_path, extra=()) -> tuple[int, Path, Path]:
    return submit_training(cluster, tmp_path, "train.sbatch", ["--ntasks-per-node=2", *extra], SAVE)


def wait_for_step(out: Path, step: int, cluster, job: int, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    while not read_metrics(out) or read_metrics(out)[-1]["step"] < step:
        state = cluster.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before step {step}"
        assert time.monotonic() < end, f"no step {step} after {timeout} s"
        time.sleep(0.3)


def seconds_until_requeued(log: Path, timeout: float = 120) -> float:
    """Seconds from now until the batch script says it requeues the job (at most ``timeout``)."""
    start = time.monotonic()
    while "requeueing" not in (log.read_text(errors="replace") if log.exists() else ""):
        if time.monotonic() - start > timeout:
            break
        time.sleep(0.3)
    return time.monotonic() - start


def requeued_at(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("sparselm: job ") and " attempt " in line]


def test_a_peer_killed_makes_the_survivors_exit_69_and_the_job_resumes_exactly(cluster, reference, tmp_path):
    """Before: every rank printed a traceback and exited 1, the job FAILED.  The ranks on n2 are killed after the
    checkpoint of step 2: the survivors exit 69 with one line, the script requeues (restart 1 of 3)."""
    job, out, log = submit(cluster, tmp_path)
    wait_for_step(out, 3, cluster, job)
    killed = rank_pids(cluster, ["n2"])
    for pid in killed:  # the ranks only: slurmd and the step's own processes stay
        os.kill(pid, signal.SIGKILL)
    to_requeue = seconds_until_requeued(log)
    text = completed(cluster, job, log)
    print(f"peer killed: requeued {to_requeue:.1f} s after the kill; {len(requeued_at(text))} attempts")
    assert killed and "a peer rank was lost (status 69): requeueing" in text, text[-4000:]
    assert any("sparselm: error:" in line and "lost" in line for line in text.splitlines()), text[-4000:]
    assert len(requeued_at(text)) == 2 and "Traceback" not in text, text[-4000:]
    assert "sparselm: resumed from" in text, text[-3000:]
    assert_same_losses(out, reference)


def test_a_node_lost_is_requeued_on_the_nodes_left(cluster, reference, tmp_path):
    """n2's cable pulled and everything on it killed (slurmd too): SLURM marks it down, the job comes back on n1 and
    n3 and resumes from the last checkpoint with the uninterrupted run's losses."""
    job, out, log = submit(cluster, tmp_path)
    wait_for_step(out, 3, cluster, job)
    assert cluster.job(job)["NodeList"] == "n[1-2]"
    cluster.link_down("n2")
    cluster.kill("n2")
    fault = time.monotonic()
    try:
        text = completed(cluster, job, log, timeout=500)
    finally:
        cluster.link_up("n2")
    print(f"node lost: job done {time.monotonic() - fault:.1f} s after the fault; attempts: {requeued_at(text)}")
    attempts = requeued_at(text)
    assert len(attempts) >= 2 and " on n[1,3] at " in attempts[-1], text[-4000:]
    assert "sparselm: hosts: n1 ranks 0-1, n3 ranks 2-3" in text, text[-4000:]
    assert_same_losses(out, reference)


def test_preemption_across_nodes_stops_every_rank_after_one_step_and_resumes(cluster, reference, tmp_path):
    """SIGUSR1 to the batch shell (what `--signal=B:USR1@SECONDS` delivers before the time limit): the ranks on both
    nodes stop after the same step, one checkpoint is written, exit 75, requeue, and the resumed run ends with the
    uninterrupted losses."""
    job, out, log = submit(cluster, tmp_path, extra=["--job-name=preempt"])
    wait_for_step(out, 1, cluster, job)
    r = cluster.run("ctl", ["scancel", "--signal=USR1", "--batch", str(job)], env=cluster.slurm_env)
    assert r.returncode == 0, r.stderr
    stopped = seconds_until_requeued(log)
    text = completed(cluster, job, log)
    print(f"preemption: requeued {stopped:.1f} s after SIGUSR1; attempts {requeued_at(text)}")
    assert text.count("got SIGUSR1") == 1 and "stopped early (status 75): requeueing" in text, text[-4000:]
    assert len(requeued_at(text)) == 2
    assert_same_losses(out, reference)
