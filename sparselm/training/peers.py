"""Where the ranks run and what happens when one of them is lost.

At start-up every rank's host is gathered once (``gather_hosts``) and logged by rank 0 as
``hosts: n1 ranks 0-1, n2 ranks 2-3``; a tensor-parallel group that spans hosts is refused
(``check_tp_placement``), since its per-layer all-reduces would then cross the network.

During the run a peer that dies (its processes killed, its node down) or stops answering (a hung node)
surfaces as a RuntimeError from gloo or NCCL whose text names no rank: ``lost_peer`` turns it into one
``PeerLostError`` line naming the lost host where the transport names its address, with the exit status
``sparselm.errors.EXIT_STATUS`` gives it (69), which the sbatch scripts requeue.
"""
from __future__ import annotations

import datetime
import os
import re
import socket
from typing import NamedTuple

import torch.distributed as dist

from sparselm.errors import ConfigError, PeerLostError
from sparselm.training.rendezvous import join

# The transports' words for a peer that went away (gloo's pair and NCCL's socket errors) and for one that stopped
# answering (a collective's timeout).
LOST = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "Connection refused",
        "NCCL communicator was aborted", "remote process exited")
TIMED_OUT = ("Timed out waiting", "Socket Timeout", "Watchdog caught collective operation timeout")
ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:(\d+)")


class Host(NamedTuple):
    """One rank's host: its name and the address its hostname resolves to (what gloo binds by default)."""
    name: str
    address: str


def this_host() -> Host:
    name = socket.gethostname()
    try:
        address = socket.gethostbyname(name)
    except OSError:
        address = ""
    return Host(name, address)


def gather_hosts() -> list[Host]:
    """Every rank's ``Host``, in rank order (collective over the default group)."""
    hosts: list = [None] * dist.get_world_size()
    dist.all_gather_object(hosts, tuple(this_host()))
    return [Host(*h) for h in hosts]


def agree_on_start(problem: str | None) -> None:
    """The first collective of every run: each rank tells whether its own start-up checks passed (``problem``:
    None, or the one-line reason they did not), so that bad input seen on one node only (a dataset or tokenizer
    missing there) stops every rank at once instead of leaving the others to wait parallel.timeout_minutes at
    the rendezvous.  Raises ConfigError naming the first failing rank, its host and its reason."""
    problems: list = [None] * dist.get_world_size()
    dist.all_gather_object(problems, (this_host().name, problem))
    for rank, (host, text) in enumerate(problems):
        if text is not None:
            raise ConfigError(f"rank {rank} on {host} cannot start: {text}")


def report_start_failure(err: BaseException, timeout_minutes: float) -> bool:
    """On a rank whose start-up checks raised ``err`` in a world of several (WORLD_SIZE > 1, the launcher's
    rendezvous variables set): join the default process group (gloo, no DeepSpeed import) and tell the others
    through ``agree_on_start``.  Returns whether this rank should print ``err`` itself: rank 0 always, another
    rank when rank 0 passed (bad input on its node only) and it is the first failing rank on its host.  Gives up
    silently when the group cannot form: the others then stop at their own rendezvous timeout."""
    rank = int(os.environ.get("RANK", "0"))
    try:
        if not dist.is_initialized():
            join("gloo", datetime.timedelta(minutes=timeout_minutes))
        problems: list = [None] * dist.get_world_size()
        dist.all_gather_object(problems, (this_host().name, f"{err}"))
    except (RuntimeError, ValueError):
        return rank == 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    me = problems[rank][0]
    first_here = min(r for r, (host, text) in enumerate(problems) if host == me and text is not None)
    return rank == 0 or (problems[0][1] is None and first_here == rank)


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    out, start = [], ranks[0]
    for prev, cur in zip(ranks, ranks[1:] + [None]):
        if cur != prev + 1:
            out.append(f"{start}" if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)


def describe_hosts(hosts: list[Host]) -> str:
    """'n1 ranks 0-1, n2 ranks 2-3' (hosts in order of their first rank)."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host.name, []).append(rank)
    return ", ".join(f"{name} rank{'s' if len(r) > 1 else ''} {_spans(r)}" for name, r in by_host.items())


def check_tp_placement(tp_groups: list[list[int]], hosts: list[Host], allow: bool) -> None:
    """Raise ConfigError naming the first tensor-parallel group whose ranks sit on more than one host (uneven
    hostfile slots, ``srun --distribution=cyclic``), unless ``allow`` (parallel.tp_across_nodes)."""
    for group in tp_groups:
        names = sorted({hosts[r].name for r in group})
        if len(names) > 1 and not allow:
            raise ConfigError(
                f"the tensor-parallel group of ranks {_spans(sorted(group))} spans hosts {', '.join(names)} "
                f"(ranks by host: {describe_hosts(hosts)}); tensor parallelism all-reduces every layer, so keep each "
                f"group of parallel.tp consecutive ranks on one node (equal slots per host, block distribution), or "
                f"set parallel.tp_across_nodes=true to run it so on purpose")


def lost_peer(err: BaseException, hosts: list[Host] | None, timeout_minutes: float) -> PeerLostError | None:
    """The ``PeerLostError`` a transport error means (None: another error).  It names the peer's host where the
    message carries its address and ``hosts`` knows it."""
    text = str(err)
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    me = this_host().name
    if any(words in text for words in LOST):
        match = ADDRESS.search(text)
        peer = ""
        if match and hosts:
            ranks = [r for r, h in enumerate(hosts) if h.address == match.group(1)]
            if ranks:
                peer = f" (host {hosts[ranks[0]].name}, ranks {_spans(ranks)})"
        where = f"{match.group(1)}:{match.group(2)}{peer}" if match else "a peer rank"
        return PeerLostError(f"rank {dist.get_rank() if dist.is_initialized() else '?'} on {me} lost its connection "
                             f"to {where}: that rank's process or node is gone; the last complete checkpoint is kept, "
                             f"resume with --train.resume=latest ({_strip(first)})")
    if any(words in text for words in TIMED_OUT):
        return PeerLostError(f"rank {dist.get_rank() if dist.is_initialized() else '?'} on {me} waited "
                             f"parallel.timeout_minutes={timeout_minutes:g} for a collective: a peer rank stopped "
                             f"answering (a hung or stopped node); the last complete checkpoint is kept, resume with "
                             f"--train.resume=latest ({_strip(first)})")
    return None


def _strip(line: str) -> str:
    """The transport's message without its source location ('[.../pair.cc:537] ')."""
    line = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", line)
    return line.split(" This is typically caused")[0][:200]
