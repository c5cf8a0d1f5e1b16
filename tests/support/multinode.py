"""What the multi-node tests share (tests/e2e/multinode): the run they compare with, starting a command on
several nodes of a tools/local_cluster.py cluster at once, and the loss comparison."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from sparselm.training.metrics import read_metrics
from support.local_slurm import missing_binaries
from support.run import BIN, PYTHON, REPO, subprocess_env

STEPS, PROCS = 6, 2
COMMON = ["--config", "tiny_moe", f"--train.steps={STEPS}", "--train.log_every=1", "--train.eval_every=0",
          "--train.progress=false", "--train.tensorboard=false"]
LAYOUT = ["--parallel.tp=2", "--parallel.ep=2"]  # 4 ranks: TP pairs {0,1} {2,3} = one per node


def env() -> dict:
    return {**subprocess_env(), "OMP_NUM_THREADS": "1"}


class Reference:
    """The one-process run on the host, started when the module starts and read when a test needs it."""

    def __init__(self, out):
        self.out, self.log = out, out.parent / "reference.log"
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen([PYTHON, "-m", "sparselm.train", *COMMON, f"--train.out_dir={out}"],
                                         cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT)

    def rows(self, timeout: float = 400) -> list[dict]:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the one-process reference took over {timeout} s:\n{self.log.read_text()[-3000:]}")
        assert self.proc.returncode == 0, self.log.read_text()[-4000:]
        return read_metrics(self.out)


def run_on_nodes(cluster, tmp_path, cmds: dict[str, list[str]], timeout: float = 300,
                 check: bool = True) -> dict[str, str]:
    """Start CMD on each node at once, wait for all; on a failure or timeout kill every node's processes and
    fail with each node's output (``check=False``: only on a timeout; every node's exit status is then in
    ``text["<node>:exit"]``)."""
    logs = {node: tmp_path / f"{node}.out" for node in cmds}
    procs = {}
    for node, cmd in cmds.items():
        with open(logs[node], "w") as out:
            procs[node] = cluster.run(node, cmd, env=env(), cwd=REPO, background=True, stdin=subprocess.DEVNULL,
                                      stdout=out, stderr=subprocess.STDOUT)
    end = time.monotonic() + timeout
    failed = None
    while any(p.poll() is None for p in procs.values()):
        bad = [n for n, p in procs.items() if p.poll() not in (None, 0)] if check else []
        if bad or time.monotonic() > end:
            failed = f"{', '.join(bad)} failed" if bad else f"timed out after {timeout} s"
            time.sleep(2 if bad else 0)  # let the other node print its side of it
            break
        time.sleep(0.5)
    if failed is None and check and any(p.returncode != 0 for p in procs.values()):
        failed = "non-zero exit"
    if failed:
        for node in procs:
            cluster.kill(node)
        for p in procs.values():
            p.wait(timeout=30)
    text = {node: logs[node].read_text(errors="replace") for node in cmds}
    text.update({f"{node}:exit": str(p.returncode) for node, p in procs.items()})
    if failed:
        detail = "\n".join(f"--- {n} (exit {procs[n].returncode})\n{t[-4000:]}" for n, t in text.items())
        pytest.fail(f"{failed}:\n{detail}")
    return text


def assert_same_losses(out, reference) -> None:
    run, want = read_metrics(out), reference.rows()
    assert [r["step"] for r in run] == list(range(1, STEPS + 1)), "one metrics line per step"
    assert len(want) == STEPS
    for got, ref in zip(run, want):
        assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5), got["step"]


def assert_rank0_on_n1(text: dict[str, str]) -> None:
    """Global rank 0 prints the start-up summary (train._say): it must be n1's, so that TP pairs stay in a node."""
    assert "4 process(es)" in text["n1"], text["n1"][-3000:]
    assert "4 process(es)" not in text["n2"], text["n2"][-3000:]
    assert "sparselm: hosts: n1 ranks 0-1, n2 ranks 2-3" in text["n1"], text["n1"][-3000:]  # logged once, by rank 0


def take_down(cluster, request, failed_before: int) -> None:
    """Take a module's cluster down, printing its daemons' logs (slurmctld, slurmd, sshd, munged) when a test of
    the module failed."""
    logs = cluster.down(dump_logs=request.session.testsfailed > failed_before)
    if logs:
        print(f"--- logs of local cluster {cluster.id}\n{logs}")


def bring_up(cluster, sshd: bool = False, slurm: bool = True):
    """Start CLUSTER's nodes (and an sshd per node, and SLURM when installed); ``cluster.slurm`` then says why SLURM
    is not running (None: it is).  On a failure the daemons' logs are printed and the cluster taken down."""
    cluster.slurm = "not asked for"
    try:
        cluster.up()
        if sshd:
            cluster.start_sshd()
        if slurm:
            missing = missing_binaries()
            cluster.slurm = (f"SLURM is not installed here (missing {', '.join(missing)}): run "
                             "slurm/install_local_cluster.sh") if missing else None
            if not missing:
                cluster.start_slurm()
    except BaseException:
        print(cluster.down(dump_logs=True))
        raise
    return cluster


def submit_training(cluster, tmp_path, script: str, sbatch_args=(), train_args=(),
                    env_extra=None) -> tuple[int, Path, Path]:
    """sbatch slurm/SCRIPT from ctl, 2 nodes, the TP2 x EP2 run into tmp_path/run: (job id, run dir, job output)."""
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch(["--nodes=2", f"--output={log}", *sbatch_args, f"slurm/{script}", *COMMON, *LAYOUT,
                          *train_args, f"--train.out_dir={out}"],
                         env={**env(), "SPARSELM_BIN": str(BIN), **(env_extra or {})}, cwd=REPO)
    return job, out, log


def completed(cluster, job: int, log: Path, timeout: float = 400) -> str:
    """Wait for JOB; fail unless it COMPLETED.  Returns its output (every attempt's, appended)."""
    info = cluster.wait_job(job, timeout=timeout)
    text = log.read_text(errors="replace") if log.exists() else ""
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{text[-5000:]}"
    return text


def rank_pids(cluster, nodes) -> list[int]:
    """The sparselm.train processes running in NODES (not slurmd, sshd or a launcher)."""
    return [pid for n in nodes for pid in cluster._ns_pids(n) if pid != cluster.holders[n]
            and "sparselm.train" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace").replace("\0", " ")]
