"""The store tests run a real Mooncake Store (cluster.py) inside a private
network namespace. Without the mooncake package or a namespace they skip;
HOSTCACHE_REQUIRE_STORE=1 (scripts/test.sh sets it, setup.sh installs
Mooncake) makes a missing package a failure, HOSTCACHE_REQUIRE_NETNS=1 a
missing namespace."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "engine")]

from procs import in_private_netns, netns_problem  # noqa: E402,F401 - the tests' helpers


@pytest.fixture(scope="session")
def store_usable() -> None:
    try:
        import mooncake.store  # noqa: F401 - its native library needs libibverbs1 and libnuma1
        why = ""
    except (ImportError, OSError) as e:
        why = f"the mooncake package cannot be imported ({e}; scripts/setup.sh installs it)"
    if why:
        if os.environ.get("HOSTCACHE_REQUIRE_STORE") == "1":
            pytest.fail(f"{why}; HOSTCACHE_REQUIRE_STORE=1")
        pytest.skip(why)
    problem = netns_problem()
    if problem:
        if os.environ.get("HOSTCACHE_REQUIRE_NETNS") == "1":
            pytest.fail(f"a private network namespace is required (HOSTCACHE_REQUIRE_NETNS=1): {problem}")
        pytest.skip(f"the store tests run in a private network namespace: {problem}")
