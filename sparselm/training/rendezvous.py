"""The rendezvous: the ranks meet in torch's TCPStore (``env://``: MASTER_ADDR:MASTER_PORT, or torchrun's agent
store) and, before gloo connects its pairs, compare what each host would advertise.

gloo (without GLOO_SOCKET_IFNAME) gives its peers the address the host's own name resolves to.  Debian and
Ubuntu map the hostname to 127.0.1.1 in /etc/hosts, so on such a node every other node would connect to
itself and the process group would hang until the timeout, with an error that blames MASTER_ADDR.  The store
already works at that point (it is reached through MASTER_ADDR, which the other nodes resolve properly), so
each rank writes there whether its name is on loopback, and every rank learns, with a few store operations
per rank (no all-to-all of host records), whether the world spans hosts and one of them is on loopback.
"""
from __future__ import annotations

import datetime
import os
import socket

import torch.distributed as dist

from sparselm.errors import LoopbackAddressError


def resolve(name: str) -> str:
    """NAME's IPv4 address as the resolver (/etc/hosts, DNS) gives it; '' when it does not resolve."""
    try:
        return socket.gethostbyname(name)
    except OSError:
        return ""


def loopback_problem(hostname: str, address: str, gloo_ifname: str) -> str | None:
    """Why this host would give the other nodes an address they cannot reach, or None.  ``address``: what
    ``hostname`` resolves to; ``gloo_ifname``: GLOO_SOCKET_IFNAME ('' when unset: gloo then advertises
    ``address``)."""
    if gloo_ifname or not address.startswith("127."):
        return None
    return (f"host '{hostname}' resolves its own name to {address}, a loopback address, so gloo would give the other "
            f"nodes an address they cannot reach: set GLOO_SOCKET_IFNAME to the network interface the nodes share "
            f"(e.g. GLOO_SOCKET_IFNAME=eth0; `ip -br addr` lists them) on every node, or map '{hostname}' to that "
            f"interface's address in /etc/hosts")


def meet(timeout: datetime.timedelta) -> tuple[dist.Store, int, int]:
    """Join the ``env://`` rendezvous (as ``init_process_group`` would) and check the hosts' addresses.

    Returns (store, rank, world_size) for ``init_process_group(store=...)``.  Raises ``LoopbackAddressError`` on
    every rank when the world spans several hosts and one of them resolves its own name to loopback without
    GLOO_SOCKET_IFNAME; the store's own errors (rendezvous unreachable, a rank that never came) propagate."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    store.set_timeout(timeout)
    # torchrun's agent store outlives a restarted worker group: keys of an earlier attempt must not count
    prefix = f"sparselm/rendezvous/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    hostname = socket.gethostname()
    if rank == 0:
        store.set(prefix + "rank0_host", hostname)
    if store.get(prefix + "rank0_host").decode() != hostname:
        store.add(prefix + "elsewhere", 1)  # ranks not on rank 0's host
    problem = loopback_problem(hostname, resolve(hostname), os.environ.get("GLOO_SOCKET_IFNAME", ""))
    if problem:
        store.set(prefix + "loopback", problem)
    if store.add(prefix + "arrived", 1) == world:
        store.set(prefix + "all_arrived", "1")
    store.wait([prefix + "all_arrived"])
    if store.add(prefix + "elsewhere", 0) > 0 and store.check([prefix + "loopback"]):
        problem = store.get(prefix + "loopback").decode()
        if store.add(prefix + "read", 1) == world:
            store.set(prefix + "all_read", "1")
        if rank == 0:  # it holds the store (env://): leaving first would cut the others off before they read
            store.wait([prefix + "all_read"])
        raise LoopbackAddressError(problem)
    return store, rank, world


def join(backend: str, timeout: datetime.timedelta) -> None:
    """``meet``, then form the default process group on its store.  Every rank must start this way: a rank
    that called ``init_process_group`` directly would never arrive at ``meet``'s count."""
    store, rank, world = meet(timeout)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
