"""LMDeploy 0.18.0's real engine in test processes: on a GPU when this build
finds a usable one, else on the CPU through the test-only shim
(site/lmdeploy_on_cpu.py). The tests themselves are the same files in
both modes; every engine runs in a subprocess of its own, so neither the
shim nor an engine's state reaches the pytest process or another engine.

HOSTCACHE_ENGINE_MODE=cpu|gpu forces a mode; HOSTCACHE_EXPECT_GPU=1 makes a
missing GPU a failure instead of the CPU mode (the GPU command sets it).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import pytest

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
SITE_DIR = HERE / "site"  # test-only sitecustomize (site/sitecustomize.py)
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from gpu_check import gpu_problem  # noqa: E402
from procs import EngineRuns, in_private_netns, netns_problem, stop_tree, tail  # noqa: E402,F401 - the tests' helpers


def _mode() -> tuple[Optional[str], str]:
    """('cpu' | 'gpu' | None, why)."""
    if importlib.util.find_spec("lmdeploy") is None:
        return None, "LMDeploy is not installed (scripts/setup.sh)"
    forced = os.environ.get("HOSTCACHE_ENGINE_MODE")
    why = gpu_problem()
    gpu = why is None
    if forced == "gpu" or os.environ.get("HOSTCACHE_EXPECT_GPU") == "1":
        return "gpu", "" if gpu else f"a GPU was expected: {why}"
    if forced == "cpu" or not gpu:
        return "cpu", ""
    return "gpu", ""


MODE, MODE_PROBLEM = _mode()


@pytest.fixture(autouse=True)
def _engine_mode_usable() -> None:
    if MODE is None:
        pytest.skip(MODE_PROBLEM)
    if MODE_PROBLEM:
        pytest.fail(MODE_PROBLEM)


def netns_required(why: str) -> None:
    """HOSTCACHE_REQUIRE_NETNS=1 (scripts/test.sh sets it): a machine that
    cannot make a private network namespace fails the server tests instead
    of skipping them."""
    if os.environ.get("HOSTCACHE_REQUIRE_NETNS") == "1":
        pytest.fail(f"a private network namespace is required (HOSTCACHE_REQUIRE_NETNS=1): {why}")


def engine_env(**extra: str) -> dict:
    """The environment of an engine process: the shim switched on in CPU mode."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
               HOSTCACHE_TEST_START_RACE="1", HOSTCACHE_TEST_LOGICAL_LRU="1")
    # The tests' pools are a few MiB: no RAM reserve, so a machine whose
    # MemAvailable starts small (some GPU sandboxes) does not refuse them.
    env.setdefault("HOSTCACHE_RAM_RESERVE_GIB", "0")
    env["PYTHONPATH"] = os.pathsep.join([str(SITE_DIR), str(HERE), str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    if MODE == "cpu":
        env["HOSTCACHE_TEST_LMDEPLOY_ON_CPU"] = "1"
        # Two cores for a few engines: one torch thread each keeps them from thrashing.
        env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


def get(results: dict, name: str) -> dict:
    res = results[name]
    if not isinstance(res, dict):
        pytest.fail(res)
    return res


@pytest.fixture(scope="session")
def engine_mode() -> str:
    return MODE


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """$HOSTCACHE_TINY_MODEL when it names a built model (scripts/gpu_all.sh
    builds one), else one built now (a few seconds, CPU)."""
    given = os.environ.get("HOSTCACHE_TINY_MODEL")
    if given and (Path(given) / "config.json").exists():
        return given
    import tiny_model

    return str(tiny_model.build(tmp_path_factory.mktemp("hc-tiny")))
