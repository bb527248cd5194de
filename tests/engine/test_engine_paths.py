"""The real engine off the happy path with the tier on (engine_paths.py, one
process): preemption under a tiny GPU cache, streams cancelled mid-decode,
sleep/wakeup, engine close and a second engine in the same process. After
each, nothing is left pinned, planned or leaked (tests/balance.py), and the
tokens still equal a never-evicting tier-off engine's."""
from __future__ import annotations

import pytest

from conftest import EngineRuns, engine_env, get


@pytest.fixture(scope="module")
def paths(tiny_model_dir, tmp_path_factory, engine_mode, run_notes) -> dict:
    jobs = {"paths": ["tests/engine/engine_paths.py", "--model", tiny_model_dir]}
    if engine_mode == "gpu":
        jobs["paths-graphs"] = jobs["paths"] + ["--graphs"]
    results = EngineRuns(tmp_path_factory.mktemp("engine-paths"), parallel=2, timeout=400).run(jobs, engine_env())
    for name, res in results.items():
        if isinstance(res, dict):
            run_notes.append(f"{engine_mode} {name}: preemptions {res['phases']['preempt']['preemptions']}, host "
                             f"{res['phases']['preempt']['host']}")
    return results


def _runs(paths: dict) -> list[dict]:
    return [get(paths, name) for name in paths]


@pytest.mark.parametrize("phase", ["preempt", "cancel", "sleep", "after", "second"])
def test_balanced_after(paths, phase):
    for res in _runs(paths):
        assert res["phases"][phase]["problems"] == [], res["phases"][phase]["problems"]


@pytest.mark.parametrize("phase", ["preempt", "after", "second"])
def test_tokens_equal_the_never_evicting_reference(paths, phase, engine_mode):
    """The reference computes these conversations in other batches (and never
    recomputes a preempted prefix): equal tokens rest on the CPU shim's
    batch-invariant numerics (docs/testing.md); a GPU run checks balance and
    restores only."""
    if engine_mode == "gpu":
        pytest.skip("other batches than the reference: token equality is verified on CPU")
    for res in _runs(paths):
        on, ref = res["phases"][phase]["turns"], res["ref"][phase]
        assert len(on) == len(ref) > 0
        diffs = [(a["conversation"], a["turn"]) for a, b in zip(on, ref) if a["tokens"] != b["tokens"]]
        assert not diffs, f"{phase}: (conversation, turn) differing from the reference: {diffs}"


def test_the_cache_was_small_enough_to_preempt(paths):
    for res in _runs(paths):
        ph = res["phases"]["preempt"]
        assert ph["preemptions"] > 0, "no sequence was preempted: the phase tests nothing"
        assert ph["host"]["host_hit_tokens"] > 0, ph["host"]


def test_streams_were_cancelled_mid_decode(paths):
    for res in _runs(paths):
        got = res["phases"]["cancel"]["tokens_before_cancel"]
        assert got and all(4 <= n < 200 for n in got), got


def test_sleep_forgets_host_entries_and_wakeup_serves_again(paths):
    """After wakeup the rebuilt pools are saved to and restored from again."""
    for res in _runs(paths):
        slept, after = res["phases"]["sleep"]["host"], res["phases"]["after"]["host"]
        assert slept["host_slots_used"] == 0, slept
        assert after["host_blocks_saved"] > slept["host_blocks_saved"], (slept, after)
        assert after["host_blocks_restored"] > slept["host_blocks_restored"], (slept, after)


def test_a_second_engine_in_the_process_restores_into_its_own_pools(paths):
    for res in _runs(paths):
        host = res["phases"]["second"]["host"]
        assert host["host_blocks_restored"] > 0 and host["host_hit_tokens"] > 0, host


def test_a_closed_engine_leaves_no_rank_store(paths):
    for res in _runs(paths):
        assert res["phases"]["second"]["rank_stores_alive"] == 1, "the closed engine's host pool is still alive"
