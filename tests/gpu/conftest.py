"""GPU tests: skipped without a usable GPU, failed instead when
HOSTCACHE_EXPECT_GPU=1 (the GPU command sets it), so a broken CUDA build on
the GPU machine cannot look green."""
from __future__ import annotations

import os

import pytest
from gpu_check import gpu_problem

_PROBLEM = gpu_problem()


@pytest.fixture(autouse=True)
def _gpu_usable() -> None:
    if _PROBLEM is None:
        return
    if os.environ.get("HOSTCACHE_EXPECT_GPU") == "1":
        pytest.fail(f"a GPU was expected (HOSTCACHE_EXPECT_GPU=1): {_PROBLEM}")
    pytest.skip(_PROBLEM)
