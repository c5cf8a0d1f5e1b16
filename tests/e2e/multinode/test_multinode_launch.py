"""Two real "nodes" on this machine (tools/local_cluster.py: network, UTS and mount namespaces, each node
with its own hostname and address, one shared file system): a TP2 x EP2 MoE run with TP inside a node and
DP/EP across nodes, launched as a user launches it on two machines (torchrun c10d, deepspeed --no_ssh, sbatch
on the cluster's own SLURM), must log the one-process run's losses, one metrics line per step.  Needs root
(and slurm-wlm + munge for the sbatch route); skips elsewhere with the reason.
"""
from __future__ import annotations

import subprocess
import time

import pytest

from sparselm.training.metrics import read_metrics
from support.run import BIN, PYTHON, REPO, subprocess_env
from support.local_slurm import missing_binaries
from tools.local_cluster import LocalCluster, missing_requirements

_why = missing_requirements()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no local multi-node cluster: {_why}")

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


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


NODE_LOCAL = "node-local"
"""A directory of the cluster's root that n2 sees as its own (a bind mount in its mount namespace only)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("cluster")
    c = LocalCluster(root, nodes=2, binds={"n2": [(root / "n2-disk", root / NODE_LOCAL)]})
    c.slurm = None  # why SLURM is not running, else None
    try:
        c.up()
        missing = missing_binaries()
        if missing:
            c.slurm = f"SLURM is not installed here (missing {', '.join(missing)}): run slurm/install_local_cluster.sh"
        else:
            c.start_slurm()
    except BaseException:
        print(c.down(dump_logs=True))
        raise
    print(f"local cluster {c.id} up in {c.startup_s} s")
    yield c
    c.down()


def run_on_nodes(cluster, tmp_path, cmds: dict[str, list[str]], timeout: float = 300, check: bool = True) -> dict[str, str]:
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


def test_torchrun_c10d_two_nodes(cluster, reference, tmp_path):
    out, port = tmp_path / "run", 29400
    cmd = [str(BIN / "torchrun"), "--nnodes=2", f"--nproc_per_node={PROCS}", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=n1:{port}", "--rdzv_id=mn-torchrun", "-m", "sparselm.train",
           *COMMON, *LAYOUT, f"--train.out_dir={out}"]
    text = run_on_nodes(cluster, tmp_path, {"n1": cmd, "n2": cmd})
    assert_rank0_on_n1(text)
    assert_same_losses(out, reference)


def test_deepspeed_no_ssh_two_nodes(cluster, reference, tmp_path):
    out, port, hostfile = tmp_path / "run", 29500, tmp_path / "hostfile"
    hostfile.write_text(f"n1 slots={PROCS}\nn2 slots={PROCS}\n")
    cmds = {f"n{i + 1}": [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
                          "--master_addr", "n1", "--master_port", str(port), "--module", "sparselm.train",
                          *COMMON, *LAYOUT, f"--train.out_dir={out}"] for i in range(2)}
    text = run_on_nodes(cluster, tmp_path, cmds)
    assert_rank0_on_n1(text)
    assert_same_losses(out, reference)


def test_sbatch_two_nodes(cluster, reference, tmp_path):
    """slurm/train.sbatch submitted from ctl: slurmd on n1 runs the script, srun starts 2 ranks on each node."""
    if cluster.slurm:
        pytest.skip(cluster.slurm)
    out, log = tmp_path / "run", tmp_path / "job.out"
    job = cluster.sbatch(["--nodes=2", "--ntasks-per-node=2", f"--output={log}", "slurm/train.sbatch",
                          *COMMON, *LAYOUT, f"--train.out_dir={out}"],
                         env={**env(), "SPARSELM_BIN": str(BIN)}, cwd=REPO)
    info = cluster.wait_job(job, timeout=300)
    text = log.read_text() if log.exists() else ""
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{text[-4000:]}\n{cluster.logs()}"
    assert "on n[1-2]" in text and "4 process(es)" in text, text[-3000:]
    assert text.count("sparselm: hosts: n1 ranks 0-1, n2 ranks 2-3") == 1, text[-3000:]
    assert_same_losses(out, reference)


def _deepspeed_no_ssh(tmp_path, slots: dict[str, int], out, port: int, extra=()) -> dict[str, list[str]]:
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{node} slots={n}\n" for node, n in slots.items()))
    return {node: [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(i),
                   "--master_addr", "n1", "--master_port", str(port), "--module", "sparselm.train",
                   *COMMON, *LAYOUT, f"--train.out_dir={out}", *extra] for i, node in enumerate(slots)}


def test_a_tensor_parallel_group_across_nodes_is_refused(cluster, tmp_path):
    """Uneven hostfile slots (3 + 1) put TP pair {2, 3} on n1 and n2: every rank stops at start-up, rank 0 names
    the group and its hosts; nothing was written."""
    text = run_on_nodes(cluster, tmp_path, _deepspeed_no_ssh(tmp_path, {"n1": 3, "n2": 1}, tmp_path / "run", 29510),
                        check=False)
    errors = [line for line in text["n1"].splitlines() if "sparselm: error:" in line]
    assert text["n1:exit"] == "2" and text["n2:exit"] == "2", text
    assert len(errors) == 1 and "ranks 2-3 spans hosts n1, n2" in errors[0], text["n1"][-3000:]
    assert "n1 ranks 0-2, n2 rank 3" in errors[0] and "parallel.tp_across_nodes" in errors[0]
    assert not (tmp_path / "run").exists()


def test_an_out_dir_that_is_not_shared_is_refused(cluster, tmp_path):
    """train.out_dir on a path n2 sees as its own disk: before, n2 started fresh while n1 resumed (or the first save
    failed half-way); now every rank stops at start-up, naming the first rank and host that cannot see it."""
    out = cluster.root / NODE_LOCAL / "run"
    text = run_on_nodes(cluster, tmp_path, _deepspeed_no_ssh(tmp_path, {"n1": 2, "n2": 2}, out, 29520), check=False)
    errors = [line for line in text["n1"].splitlines() if "sparselm: error:" in line]
    assert text["n1:exit"] == "2" and text["n2:exit"] == "2", text
    assert len(errors) == 1 and f"train.out_dir '{out}' is not shared: rank 2 on n2" in errors[0], text["n1"][-3000:]
    assert not out.exists()  # rank 0 removed the directory its run lock created
