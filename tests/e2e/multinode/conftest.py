"""The one-process reference run, once per test worker (every multi-node module compares with it)."""
from __future__ import annotations

import pytest

from support.multinode import Reference


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    ref = Reference(tmp_path_factory.mktemp("reference") / "run")
    yield ref
    if ref.proc.poll() is None:
        ref.proc.kill()
        ref.proc.wait()
