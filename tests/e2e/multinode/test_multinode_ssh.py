"""The deepspeed launcher's default route (a hostfile, pdsh over ssh from the first node) and the interface trap of
Debian-style hosts, on two namespace "nodes" (tools/local_cluster.py) whose /etc/hosts map their own name to
127.0.1.1, with one sshd per node and a SLURM.  Without GLOO_SOCKET_IFNAME every node stops at the rendezvous with
one line naming the address; with it (from .deepspeed_env over pdsh, or from the submitting shell through
sbatch) the TP2 x EP2 run logs the one-process losses.  Needs root, openssh-server + pdsh and slurm-wlm + munge
(slurm/install_local_cluster.sh); skips elsewhere with the reason.
"""
from __future__ import annotations

import shutil
import signal
import subprocess
import time

import pytest

from sparselm.training.metrics import read_metrics
from support.multinode import (
    COMMON,
    LAYOUT,
    PROCS,
    assert_rank0_on_n1,
    assert_same_losses,
    bring_up,
    completed,
    env,
    rank_pids,
    run_on_nodes,
    submit_training,
    take_down,
)
from support.run import BIN
from tools.local_cluster import LocalCluster, missing_requirements

_why = missing_requirements() or next((f"no `{b}` (openssh-server, pdsh: slurm/install_local_cluster.sh)"
                                        for b in ("pdsh", "sshd", "ssh") if not shutil.which(b)
                                        and not shutil.which(b, path="/usr/sbin")), None)
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no local multi-node cluster with ssh: {_why}")

LOOPBACK = "127.0.1.1"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("cluster")
    c = bring_up(LocalCluster(root, nodes=2, hosts_extra={n: [f"{LOOPBACK} {n}"] for n in ("n1", "n2")}), sshd=True)
    failed = request.session.testsfailed
    yield c
    take_down(c, request, failed)


def hostfile_route(tmp_path, out, port: int, extra=()) -> list[str]:
    """`deepspeed --hostfile` as typed on the first node: pdsh runs a launcher on every host over ssh."""
    (tmp_path / "hostfile").write_text(f"n1 slots={PROCS}\nn2 slots={PROCS}\n")
    return [str(BIN / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--master_addr", "n1",
            "--master_port", str(port), "--module", "sparselm.train", *COMMON, *LAYOUT, f"--train.out_dir={out}",
            *extra]


def test_a_hostname_on_loopback_stops_every_node_with_one_line(cluster, tmp_path):
    """Before: gloo handed each node's peers 127.0.1.1 and the ranks waited parallel.timeout_minutes, then blamed
    MASTER_ADDR.  Now the ranks compare addresses in the rendezvous store first: exit 2 at once on both nodes."""
    cmds = {f"n{i + 1}": [str(BIN / "deepspeed"), "--hostfile", str(tmp_path / "hostfile"), "--no_ssh",
                          "--node_rank", str(i), "--master_addr", "n1", "--master_port", "29600",
                          "--module", "sparselm.train", *COMMON, *LAYOUT, f"--train.out_dir={tmp_path / 'run'}"]
            for i in range(2)}
    (tmp_path / "hostfile").write_text(f"n1 slots={PROCS}\nn2 slots={PROCS}\n")
    started = time.monotonic()
    text = run_on_nodes(cluster, tmp_path, cmds, check=False)
    elapsed = time.monotonic() - started
    assert text["n1:exit"] == "2" and text["n2:exit"] == "2", text
    for node in ("n1", "n2"):
        errors = [line for line in text[node].splitlines() if "sparselm: error:" in line]
        assert len(errors) == 1, text[node][-3000:]  # one line per node, from its local rank 0
        assert f"resolves its own name to {LOOPBACK}" in errors[0] and "GLOO_SOCKET_IFNAME" in errors[0], errors
        assert "Traceback" not in text[node]
    print(f"loopback hostname: both nodes exited 2 after {elapsed:.1f} s (launch included)")
    assert elapsed < 120, elapsed  # parallel.timeout_minutes is 30 here: the check does not wait for it


def test_the_hostfile_route_over_pdsh_takes_deepspeed_env_to_every_node(cluster, reference, tmp_path):
    """GLOO_SOCKET_IFNAME is set only in .deepspeed_env (in the directory the launch is typed in): pdsh's remote
    shells start with a bare environment, so the run passing on both loopback-mapped nodes shows it arrived."""
    (tmp_path / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=eth1\nOMP_NUM_THREADS=1\n")
    out = tmp_path / "run"
    runner_env = {k: v for k, v in env().items() if not k.startswith("GLOO_")}
    started = time.monotonic()
    p = cluster.run("n1", hostfile_route(tmp_path, out, 29610), env=runner_env, cwd=tmp_path, timeout=400,
                    stdin=subprocess.DEVNULL)
    print(f"pdsh route: {time.monotonic() - started:.1f} s for {len(read_metrics(out))} steps")
    assert p.returncode == 0, (p.stdout + p.stderr)[-5000:]
    text = p.stdout + p.stderr
    assert "deepspeed_env file" in text and "n1: " in text and "n2: " in text, text[-3000:]  # pdsh's node prefixes
    assert "sparselm: hosts: n1 ranks 0-1, n2 ranks 2-3" in text, text[-3000:]
    assert_same_losses(out, reference)


def test_sbatch_takes_gloo_socket_ifname_from_the_submitting_shell(cluster, reference, tmp_path):
    if cluster.slurm:
        pytest.skip(cluster.slurm)
    job, out, log = submit_training(cluster, tmp_path, "train.sbatch", ["--ntasks-per-node=2"],
                                    env_extra={"GLOO_SOCKET_IFNAME": "eth1"})
    assert_rank0_on_n1({"n1": completed(cluster, job, log, timeout=300), "n2": ""})
    assert_same_losses(out, reference)


def _start_hostfile_route(cluster, tmp_path, out, port: int, extra=()) -> subprocess.Popen:
    (tmp_path / ".deepspeed_env").write_text("GLOO_SOCKET_IFNAME=eth1\nOMP_NUM_THREADS=1\n")
    with open(tmp_path / "runner.out", "w") as log:
        p = cluster.run("n1", hostfile_route(tmp_path, out, port, extra=["--train.steps=400", *extra]), env=env(),
                        cwd=tmp_path, background=True, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    end = time.monotonic() + 300
    while len(read_metrics(out)) < 2 and p.poll() is None and time.monotonic() < end:
        time.sleep(0.5)
    assert p.poll() is None, (tmp_path / "runner.out").read_text()[-3000:]
    return p


@pytest.mark.kills_deepspeed_launchers
def test_sigterm_to_the_pdsh_runner_ends_the_ranks_without_a_checkpoint(cluster, tmp_path):
    """What docs/launching.md says of this route: a SIGTERM (or Ctrl-C) to `deepspeed --hostfile` makes the runner
    kill pdsh and pkill every node's launcher; the ranks, their output pipes gone, end without saving: the run
    resumes from its last checkpoint."""
    out = tmp_path / "run"
    p = _start_hostfile_route(cluster, tmp_path, out, 29620)
    step = len(read_metrics(out))
    p.send_signal(signal.SIGTERM)
    sent = time.monotonic()
    p.wait(timeout=120)
    end = sent + 60
    while rank_pids(cluster, cluster.nodes) and time.monotonic() < end:
        time.sleep(0.5)
    gone = time.monotonic() - sent
    print(f"SIGTERM to the pdsh runner after step {step}: runner exit {p.returncode}, every rank gone after "
          f"{gone:.1f} s")
    assert p.returncode != 0 and not rank_pids(cluster, cluster.nodes)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").glob("step_*"))


def test_the_stop_file_stops_every_node_of_the_pdsh_route_with_one_checkpoint(cluster, tmp_path):
    """The way to stop this route and keep the work: train.stop_file, on the shared file system; every rank stops
    after the same step, saves once, and the runner exits 75 (pdsh -S passes on the ranks' status)."""
    out, stop = tmp_path / "run", tmp_path / "STOP"
    p = _start_hostfile_route(cluster, tmp_path, out, 29630, extra=[f"--train.stop_file={stop}"])
    stop.touch()
    sent = time.monotonic()
    p.wait(timeout=180)
    steps = [r["step"] for r in read_metrics(out)]
    ckpts = sorted(d.name for d in (out / "checkpoints").glob("step_*"))
    print(f"stop file on the pdsh route: runner exit {p.returncode} {time.monotonic() - sent:.1f} s after the file "
          f"appeared; checkpoints {ckpts}")
    assert p.returncode == 75, (tmp_path / "runner.out").read_text()[-3000:]
    assert ckpts == [f"step_{steps[-1]}"] and not rank_pids(cluster, cluster.nodes)
