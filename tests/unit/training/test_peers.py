"""Placement and lost-peer wording from gathered hosts (the multi-process behaviour: tests/e2e/test_peer_failures.py)."""
from __future__ import annotations

import pytest

from sparselm.config import ConfigError
from sparselm.parallel.layout import Layout
from sparselm.training.peers import Host, check_tp_placement, describe_hosts, lost_peer

N1, N2 = Host("n1", "10.77.0.1"), Host("n2", "10.77.0.2")


def _tp_groups(layout: Layout, world: int) -> list[list[int]]:
    return [list(g) for g in sorted({tuple(layout.group("tp", r)) for r in range(world)})]


def test_hosts_are_described_by_rank_ranges():
    assert describe_hosts([N1, N1, N2, N2]) == "n1 ranks 0-1, n2 ranks 2-3"
    assert describe_hosts([N1, N2, N1, N2]) == "n1 ranks 0, 2, n2 ranks 1, 3"
    assert describe_hosts([N1]) == "n1 rank 0"


def test_a_tp_group_on_one_host_passes_and_one_across_hosts_is_refused():
    layout = Layout(tp=2, pp=1, dp=2, ep=1)
    check_tp_placement(_tp_groups(layout, 4), [N1, N1, N2, N2], allow=False)  # 2 + 2 slots: TP inside a node
    with pytest.raises(ConfigError) as err:  # srun --distribution=cyclic: ranks alternate between the nodes
        check_tp_placement(_tp_groups(layout, 4), [N1, N2, N1, N2], allow=False)
    msg = str(err.value)
    assert "ranks 0-1 spans hosts n1, n2" in msg and "n1 ranks 0, 2, n2 ranks 1, 3" in msg
    assert "parallel.tp_across_nodes=true" in msg
    with pytest.raises(ConfigError, match="ranks 2-3 spans hosts n1, n2"):  # uneven slots: 3 on n1, 1 on n2
        check_tp_placement(_tp_groups(layout, 4), [N1, N1, N1, N2], allow=False)
    check_tp_placement(_tp_groups(layout, 4), [N1, N2, N1, N2], allow=True)


def test_transport_errors_become_one_line_naming_the_lost_host():
    hosts = [N1, N1, N2, N2]
    crash = RuntimeError("[/x/gloo/transport/tcp/pair.cc:537] Read error [10.77.0.2]:4242: Connection reset by peer. "
                         "This is typically caused by a remote worker hanging or bugs in the application.")
    lost = lost_peer(crash, hosts, 1.0)
    assert "10.77.0.2:4242 (host n2, ranks 2-3)" in str(lost) and "This is typically" not in str(lost)
    hang = RuntimeError("[/x/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 60000ms for recv operation")
    assert "parallel.timeout_minutes=1" in str(lost_peer(hang, hosts, 1.0))
    assert lost_peer(RuntimeError("shape mismatch in matmul"), hosts, 1.0) is None


def test_a_loopback_hostname_is_named_unless_gloo_is_given_an_interface():
    """meet() raises this on every rank when the world spans hosts (tests/e2e/multinode checks that part)."""
    from sparselm.training.rendezvous import loopback_problem

    problem = loopback_problem("n1", "127.0.1.1", "")
    assert "'n1' resolves its own name to 127.0.1.1" in problem and "GLOO_SOCKET_IFNAME" in problem
    assert loopback_problem("n1", "127.0.1.1", "eth1") is None  # the interface is named
    assert loopback_problem("n1", "10.77.0.1", "") is None
