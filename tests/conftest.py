"""Fixtures and markers only; helpers live in tests/support (imported as ``support.<module>``).

Markers follow the room a test sits in: tests/distributed -> ``distributed`` (real multi-process worlds on
gloo), tests/e2e -> ``e2e`` (the commands users type, as subprocesses), and tests/e2e/multinode -> ``e2e``
and ``multinode`` (launches across network-namespace "nodes", tools/local_cluster.py; root only). ``gpu`` is set by the test itself and
skips without a CUDA device; ``tools/gpu_check.py`` selects ``-m gpu``.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from support.run import TINY

ROOM_MARKERS = {"distributed": "distributed", "e2e": "e2e", "multinode": "multinode"}
TESTS = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    for item in items:
        for room in Path(item.fspath).resolve().relative_to(TESTS).parts[:-1]:  # every folder on the way
            if room in ROOM_MARKERS:
                item.add_marker(ROOM_MARKERS[room])


def pytest_runtest_setup(item):
    mark = item.get_closest_marker("gpu")
    if mark is not None:
        import torch

        if not torch.cuda.is_available():
            pytest.skip(mark.kwargs.get("reason", "needs a CUDA GPU"))


@pytest.fixture
def tiny():
    return list(TINY)
