"""The host tier inside LMDeploy 0.18.0's real scheduler and block trie,
multi-turn sessions under GPU-memory pressure, on CPU (see sim_engine.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lmdeploy")

from sim_engine import SimEngine  # noqa: E402

HERE = os.path.dirname(__file__)


def chat_workload(eng: SimEngine, seed: int = 1, sessions: int = 6, rounds: int = 3, concurrent: bool = False) -> None:
    """Sessions sharing a system prompt, each turn appending a new message."""
    rng = np.random.default_rng(seed)
    system = rng.integers(100, 200, size=40)
    for rnd in range(rounds):
        prompts = {}
        for sid in range(sessions):
            p = rng.integers(1000, 2000, size=int(rng.integers(10, 30)))
            prompts[sid] = np.concatenate([system, p]) if rnd == 0 else p
        steps = int(rng.integers(3, 12))
        if concurrent:
            eng.turns(prompts, decode_steps=steps)
        else:
            for sid, p in prompts.items():
                eng.turn(sid, p, decode_steps=steps)


def assert_balanced(eng: SimEngine) -> None:
    """No pinned slot, no leaked GPU block: what is allocated is the trie."""
    sched = eng.scheduler
    bm = sched.block_manager
    trie_nodes = 0
    stack = list(sched.block_trie._roots.values())
    while stack:
        node = stack.pop()
        stack.extend(node.children.values())
        if node.parent is not None:
            trie_nodes += 1
            assert int(bm.allocator.get_ref_count(node.block_id)) == 1
    usable = sched.cache_config.num_gpu_blocks - sched.cache_config.num_reserved_gpu_blocks
    assert bm.get_num_free_gpu_blocks() + trie_nodes == usable
    if eng.tier is not None:
        ix = eng.tier.index
        ix.check_invariants()
        assert all(ix.pins(s) == 0 for s in range(ix.capacity)), "a host slot is still pinned"
        assert not eng.tier._restores and not eng.tier._pre


@pytest.mark.parametrize("policy", ["write_through", "write_through_selective", "write_back"])
def test_multiturn_reads_exact_bytes_and_hits_host(policy):
    off = SimEngine(num_gpu_blocks=24)
    chat_workload(off)
    on = SimEngine(num_gpu_blocks=24, host_slots=64, policy=policy)
    chat_workload(on)  # every forward checks every token it reads (sim_engine.forward)
    s = on.tier.metrics()
    assert s["host_hit_tokens"] > 0, s
    assert on.stats.tokens_computed < off.stats.tokens_computed
    assert on.hit_rate() > off.hit_rate()
    on.end_all()
    off.end_all()
    assert_balanced(on)


def test_statistics_add_up():
    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    chat_workload(eng, rounds=4)
    tier, st = eng.tier, eng.tier.stats
    bs = eng.bs
    assert st.hit_tokens == (st.blocks_restored + st.restores_skipped) * bs
    assert st.hit_tokens <= st.queried_tokens
    trie = eng.scheduler.block_trie.stats
    assert trie.num_hit_tokens >= st.hit_tokens  # host hits count in LMDeploy's own hit rate
    assert eng.hit_rate() == pytest.approx(trie.num_hit_tokens / trie.num_query_tokens)
    s = tier.metrics()
    assert s["host_bytes_restored"] == st.blocks_restored * eng.block_bytes
    assert s["host_slots_used"] == st.blocks_saved - s["host_evictions"]


def test_small_host_pool_evicts_and_stays_exact():
    eng = SimEngine(num_gpu_blocks=24, host_slots=6)
    chat_workload(eng, rounds=4)
    s = eng.tier.metrics()
    assert s["host_evictions"] > 0 and s["host_slots_used"] <= 6
    eng.end_all()
    assert_balanced(eng)


def test_concurrent_admission_rolls_back_cleanly():
    """Batches of queued turns under pressure: admission fails for some and
    rolls back their tentative matches, host pins included."""
    eng = SimEngine(num_gpu_blocks=20, host_slots=64, max_batches=4)
    chat_workload(eng, sessions=5, rounds=4, concurrent=True)
    assert eng.tier.metrics()["host_hit_tokens"] > 0
    assert not eng.tier._restores  # every planned or cancelled
    eng.end_all()
    assert_balanced(eng)


def _trace(host_slots: int) -> dict:
    eng = SimEngine(num_gpu_blocks=24, host_slots=host_slots)
    chat_workload(eng)
    return {"trace": eng.stats.trace, "hit_rate": eng.hit_rate(),
            "free": int(eng.scheduler.block_manager.get_num_free_gpu_blocks())}


def test_tier_off_behaves_like_unpatched_lmdeploy():
    """Same sessions with the tier not requested (patches active) and with
    LMDeploy left unpatched (LMDEPLOY_HOSTCACHE_DISABLE=1, another process):
    the same forwards, the same hit rate, the same free blocks."""
    patched = _trace(host_slots=0)
    code = (f"import sys, json; sys.path.insert(0, {HERE!r}); import test_scheduler_tier as t; "
            "import lmdeploy_patch; assert not lmdeploy_patch.status()['applied']; print(json.dumps(t._trace(0)))")
    env = dict(os.environ, LMDEPLOY_HOSTCACHE_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    unpatched = json.loads(out.stdout.strip().splitlines()[-1])
    assert json.loads(json.dumps(patched)) == unpatched
