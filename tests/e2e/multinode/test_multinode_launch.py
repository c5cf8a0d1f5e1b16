"""Two real "nodes" on this machine (tools/local_cluster.py: network, UTS and mount namespaces, each node
with its own hostname and address, one shared file system): a TP2 x EP2 MoE run with TP inside a node and
DP/EP across nodes, launched as a user launches it on two machines (torchrun c10d, deepspeed --no_ssh, sbatch
on the cluster's own SLURM), must log the one-process run's losses, one metrics line per step.  Needs root
(and slurm-wlm + munge for the sbatch route); skips elsewhere with the reason.
"""
from __future__ import annotations

import pytest

from support.multinode import (
    COMMON,
    LAYOUT,
    PROCS,
    assert_rank0_on_n1,
    assert_same_losses,
    bring_up,
    completed,
    run_on_nodes,
    submit_training,
    take_down,
)
from support.run import BIN
from tools.local_cluster import LocalCluster, missing_requirements

_why = missing_requirements()
pytestmark = pytest.mark.skipif(_why is not None, reason=f"no local multi-node cluster: {_why}")

NODE_LOCAL = "node-local"
"""A directory of the cluster's root that n2 sees as its own (a bind mount in its mount namespace only)."""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, request):
    root = tmp_path_factory.mktemp("cluster")
    c = bring_up(LocalCluster(root, nodes=2, binds={"n2": [(root / "n2-disk", root / NODE_LOCAL)]}))
    print(f"local cluster {c.id} up in {c.startup_s} s")
    failed = request.session.testsfailed
    yield c
    take_down(c, request, failed)


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
    job, out, log = submit_training(cluster, tmp_path, "train.sbatch", ["--ntasks-per-node=2"])
    text = completed(cluster, job, log, timeout=300)
    assert "on n[1-2]" in text and "4 process(es)" in text, text[-3000:]
    assert text.count("sparselm: hosts: n1 ranks 0-1, n2 ranks 2-3") == 1, text[-3000:]
    assert_same_losses(out, reference)


def test_sbatch_deepspeed_launcher_two_nodes(cluster, reference, tmp_path):
    """slurm/train_deepspeed.sbatch: srun starts one `deepspeed --no_ssh --node_rank $SLURM_NODEID` per node."""
    if cluster.slurm:
        pytest.skip(cluster.slurm)
    job, out, log = submit_training(cluster, tmp_path, "train_deepspeed.sbatch",
                                    env_extra={"PROCS_PER_NODE": str(PROCS)})
    text = completed(cluster, job, log, timeout=300)
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


def test_a_node_local_corpus_cache_is_built_once_per_node(cluster, tmp_path):
    """SPARSELM_CACHE on a path that is n2's own disk: each node's ranks build the default corpus once, under the
    cache's file lock (local rank 0 of n1 and of n2 write it; the others wait and read), in a temporary directory
    named by host; before, global rank 0 built it and every rank of n2 tokenized it at once."""
    cache = cluster.root / NODE_LOCAL / "cache"
    cmd = ["env", f"SPARSELM_CACHE={cache}", str(BIN / "torchrun"), "--nnodes=2", f"--nproc_per_node={PROCS}",
           "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29410", "--rdzv_id=mn-cache", "-m", "sparselm.train",
           *COMMON, *LAYOUT, "--train.steps=1", f"--train.out_dir={tmp_path / 'run'}"]
    text = run_on_nodes(cluster, tmp_path, {"n1": cmd, "n2": cmd})
    for node, disk in (("n1", cache), ("n2", cluster.root / "n2-disk" / "cache")):
        built = [line for line in text[node].splitlines() if "sparselm: tokenizing the default corpus" in line]
        assert len(built) == 1 and f"into {cache}/" in built[0], text[node][-3000:]  # the same path, two disks
        assert built[0].endswith(f"on {node}, once per cache directory"), built
        assert len(list(disk.glob("*/done"))) == 1 and not list(disk.glob("*.tmp-*")), sorted(disk.iterdir())
