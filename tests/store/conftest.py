"""The store tests run a real Mooncake Store (cluster.py) inside a private
network namespace; when they skip and when that fails: cluster.store_problem."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "engine")]

from cluster import store_problem  # noqa: E402
from procs import in_private_netns  # noqa: E402,F401 - the tests' helpers


@pytest.fixture(scope="session")
def store_usable() -> None:
    why, fail = store_problem()
    if why:
        pytest.fail(why) if fail else pytest.skip(why)
