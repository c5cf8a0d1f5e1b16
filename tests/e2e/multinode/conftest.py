"""The one-process reference run, once per test worker (every multi-node module compares with it), and the
lock that keeps a test that kills every DeepSpeed launcher from running beside the others."""
from __future__ import annotations

import fcntl
import tempfile
from pathlib import Path

import pytest

from support.multinode import Reference


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()


LAUNCHERS_LOCK = Path(tempfile.gettempdir()) / "sparselm-multinode-tests.lock"


@pytest.fixture(autouse=True)
def launchers_alone(request):
    """DeepSpeed's pdsh runner answers SIGTERM with ``pkill -f "<python> -u -m deepspeed.launcher.launch"`` on
    every host, and the namespace nodes share one process table: it would also kill the launchers of a test
    running beside it on the other worker.  A test marked ``kills_deepspeed_launchers`` takes this lock alone;
    every other multi-node test shares it (flock on a file in the temporary directory)."""
    alone = request.node.get_closest_marker("kills_deepspeed_launchers") is not None
    with open(LAUNCHERS_LOCK, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
