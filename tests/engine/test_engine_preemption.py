"""Long replies on a GPU cache too small for the turns in flight, through
LMDeploy 0.18.0's real engine (as test_engine_turns.py, one process per
configuration): 12 sessions x 3 turns of 150 greedy tokens, each turn's
requests in flight together on 40 GPU blocks, so the scheduler preempts
running sequences (back to waiting with their blocks, which a later
admission reclaims; the preempted sequence is admitted again later and
recomputes what the trie and the host tier do not hold).

  ref   : tier off, 512 GPU blocks: nothing is evicted or preempted;
  on    : tier on, 40 GPU blocks, host pool 16x;
  fault : `on` with every restored block zeroed after it landed.

A preempted sequence's full blocks are in the trie (and saved); its partial
last block is not, and before session tails (lmdeploy_patch/scheduler_tier.py)
its re-admission recomputed it. `on` must give the reference's tokens (every
restore, tails included, holds the computed bytes), restore tails, and cache
no turn's prompt more than one block short of the reference.
"""
from __future__ import annotations

import pytest

from conftest import EngineRuns, engine_env, get

BLOCK = 64
ARGS = ["--sessions", "12", "--turns", "3", "--max-new-tokens", "150", "--concurrent", "--eager"]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory, engine_mode) -> dict:
    # On a GPU the concurrent batches change bf16 results: resend fixed replies there.
    common = ["tests/engine/turns.py", "--model", tiny_model_dir, *ARGS] + ["--fixed-replies"] * (engine_mode == "gpu")
    on = ["--gpu-blocks", "40", "--host-cache-ratio", "16"]
    jobs = {"ref": common + ["--gpu-blocks", "512"], "on": common + on,
            "fault": common + on + ["--fault", "corrupt-restores"]}
    return EngineRuns(tmp_path_factory.mktemp("engine-preemption"), 2 if engine_mode == "cpu" else 3,
                      timeout=300).run(jobs, engine_env())


def test_preempted_sequences_come_back_with_their_tails(runs):
    host = get(runs, "on")["metrics"]["host_cache"]
    # stopped sequences' tails are not saved by default: these are the preempted ones'
    assert host["host_tails_saved"] > 0 and host["host_tail_hit_tokens"] > 0, host
    assert host["host_lost_preempted_tokens"] > 0, host  # the scheduler really preempted


def test_preemption_costs_no_token(runs, engine_mode):
    if engine_mode == "gpu":
        pytest.skip("concurrent turns batch differently from the reference: token equality is verified on CPU")
    on, ref = get(runs, "on"), get(runs, "ref")
    diffs = [(a["session"], a["turn"]) for a, b in zip(on["turns"], ref["turns"]) if a["tokens"] != b["tokens"]]
    assert len(on["turns"]) == len(ref["turns"]) == 36 and not diffs, diffs


def test_no_turn_is_cached_more_than_a_block_short(runs):
    on, ref = get(runs, "on"), get(runs, "ref")
    short = [(a["session"], a["turn"], a["cached_tokens"], b["cached_tokens"])
             for a, b in zip(on["turns"], ref["turns"]) if a["cached_tokens"] < b["cached_tokens"] - BLOCK + 1]
    assert not short, f"(session, turn, on, ref) cached more than a block short: {short}"


def test_corrupted_restores_change_the_tokens_here_too(runs, engine_mode):
    if engine_mode == "gpu":
        pytest.skip("token equality is verified on CPU")
    bad, ref = get(runs, "fault"), get(runs, "ref")
    assert bad["metrics"]["host_cache"]["host_tail_hit_tokens"] > 0
    assert any(a["tokens"] != b["tokens"] for a, b in zip(bad["turns"], ref["turns"]))
