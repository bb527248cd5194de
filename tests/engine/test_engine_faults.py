"""Injected faults (lmdeploy_patch/faults.py, HOSTCACHE_FAULTS) and
verified restores (host_cache_verify) through LMDeploy 0.18.0's real
engine, the plan of test_engine_turns.py (6 sessions x 4 turns, greedy, a
32-block GPU cache, host pool 8x), one process per configuration:

  ref      : tier off, 256 GPU blocks (never evicts);
  faults   : tier on, verification on, and every kind of fault at once:
             chunks that cannot be pinned, copies the engine refuses, copies
             that fail after they were queued, saved slots corrupted in host
             memory, restored blocks corrupted after they landed, slow copies;
  corrupt  : tier on, verification off, saved slots corrupted (negative
             control: the corruption reaches the model);
  no-pool  : tier on, but the host pool cannot be allocated.

Each fault may cost a copy by the fallback path or a recompute, never a
token: `faults` and `no-pool` must give the reference's tokens, count what
happened, and end balanced (no pinned slot, no leaked GPU block). `corrupt`
must not, or the equality proves nothing.
"""
from __future__ import annotations

import pytest

from conftest import EngineRuns, engine_env, get

EVERY_FAULT = "chunk=7,queue=5,copy=3,corrupt=4,corrupt_restore=3,slow=0.002"
# On a GPU a copy that fails after it was queued is a device fault (faults.py refuses to stand in for it there).
GPU_FAULTS = "chunk=7,queue=5,corrupt=4,corrupt_restore=3,slow=0.002"


def _argv(model: str, blocks: int, ratio: float = 0.0, faults: str = "", verify: bool = False) -> list[str]:
    argv = ["tests/engine/turns.py", "--model", model, "--gpu-blocks", str(blocks), "--host-cache-ratio", str(ratio),
            "--eager", "--balance"]
    return argv + (["--faults", faults] if faults else []) + ["--verify"] * verify


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, engine_mode) -> dict:
    m = tiny_model_dir
    every = EVERY_FAULT if engine_mode == "cpu" else GPU_FAULTS
    jobs = {"ref": _argv(m, 256), "faults": _argv(m, 32, 8.0, every, verify=True),
            "corrupt": _argv(m, 32, 8.0, "corrupt=2"), "no-pool": _argv(m, 32, 8.0, "build=1")}
    return EngineRuns(tmp_path_factory.mktemp("engine-faults"), 2 if engine_mode == "cpu" else 4,
                      timeout=300).run(jobs, engine_env())


def _same_tokens(a: dict, b: dict) -> list:
    return [(x["session"], x["turn"]) for x, y in zip(a["turns"], b["turns"]) if x["tokens"] != y["tokens"]]


def test_every_fault_costs_no_token(runs):
    run, ref = get(runs, "faults"), get(runs, "ref")
    assert len(run["turns"]) == len(ref["turns"]) == 24
    assert not _same_tokens(run, ref), _same_tokens(run, ref)
    assert run["balance_problems"] == [], run["balance_problems"]


def test_every_fault_was_met_and_counted(runs):
    host = get(runs, "faults")["metrics"]["host_cache"]
    assert host["host_blocks_restored"] > 0 and host["host_hit_tokens"] > 0, host
    assert host["host_copy_failures"] > 0 and host["host_copies_redone"] >= host["host_copy_failures"], host
    assert host["host_verify_failures"] > 0 and host["host_verify_dropped_blocks"] > 0, host  # corrupt
    assert host["host_restore_mismatches"] > 0, host  # corrupt_restore
    assert host["host_tier_off"] == 0, host


def test_corruption_without_verification_reaches_the_model(runs):
    """Negative control for the test above."""
    bad, ref = get(runs, "corrupt"), get(runs, "ref")
    assert bad["metrics"]["host_cache"]["host_blocks_restored"] > 0
    assert _same_tokens(bad, ref), "corrupted host slots went unnoticed: the token comparison cannot fail"


def test_a_pool_that_cannot_be_allocated_leaves_the_engine_serving(runs):
    run, ref = get(runs, "no-pool"), get(runs, "ref")
    assert not _same_tokens(run, ref) and run["balance_problems"] == []
    assert run["metrics"]["host_cache"] is None  # the tier is off: LMDeploy's own figures only
    said = [line for line in run["hostcache_log"] if "could not be set up" in line]
    assert len(said) == 1 and "injected fault" in said[0], run["hostcache_log"]
