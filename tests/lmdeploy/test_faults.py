"""Injected faults (lmdeploy_patch/faults.py) and verified restores
(host_cache_verify) on LMDeploy 0.18.0's real scheduler with the core's CPU
SlotStore (benchmark/sim_engine.py): every forward checks every byte it reads, so a
fault the tier did not absorb fails the run. Each fault may cost at most a
recompute; afterwards nothing stays pinned and the allocator is balanced."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("lmdeploy")

from benchmark.sim_engine import SimEngine  # noqa: E402
from test_scheduler_tier import assert_balanced, chat_workload  # noqa: E402

from lmdeploy_patch import faults, slot_ledger  # noqa: E402


def test_fault_specs_parse_or_say_what_to_write():
    assert faults.parse("queue=3, copy=2,slow=0.01") == {"queue": 3, "copy": 2, "slow": 0.01}
    assert faults.parse("") == {}
    for bad, what in [("melt=1", "is not KIND=N"), ("queue", "is not KIND=N"), ("queue=0", "bad count"),
                      ("copy=x", "bad count"), ("slow=-1", "bad count"), ("slow=inf", "bad count")]:
        with pytest.raises(ValueError, match=what) as info:
            faults.parse(bad)
        assert "HOSTCACHE_FAULTS" in str(info.value) and "corrupt_restore" in str(info.value)


def test_a_plan_fires_every_nth_event():
    plan = faults.FaultPlan({"queue": 3})
    assert [plan.fires("queue") for _ in range(7)] == [False, False, True, False, False, True, False]
    assert not plan.fires("copy") and plan.fired == {"queue": 2}


def _run(monkeypatch, spec: str, verify: bool = False, policy: str = "write_through") -> SimEngine:
    monkeypatch.setenv("HOSTCACHE_FAULTS", spec)
    monkeypatch.setattr(faults, "_PLANS", {})  # a plan's counts go on across pools in a process
    eng = SimEngine(num_gpu_blocks=24, host_slots=64, policy=policy, verify=verify)
    chat_workload(eng, rounds=4)  # raises if any forward reads a wrong byte
    return eng


def _figures(eng: SimEngine) -> dict:
    from lmdeploy_patch.rank_tier import local_figures

    return {**eng.tier.metrics(), **local_figures(id(eng.scheduler.cache_config))}


@pytest.mark.parametrize("spec", ["chunk=3", "queue=2", "copy=2", "chunk=5,queue=4,copy=3,slow=0.001"])
@pytest.mark.parametrize("policy", ["write_through", "write_back"])
def test_failed_copies_are_made_again_and_serving_is_exact(monkeypatch, spec, policy):
    eng = _run(monkeypatch, spec, policy=policy)
    m = _figures(eng)
    fired = eng.worker.store.plan.fired
    assert sum(fired.values()) > 0, fired
    # every refused or failed copy was made again by the fallback path
    assert m["host_copy_failures"] == sum(fired.values()) == m["host_copies_redone"], (m, fired)
    assert m["host_hit_tokens"] > 0 and m["host_blocks_restored"] > 0, m
    assert not eng.worker.ledger.lost and m["host_tier_off"] == 0
    eng.end_all()
    assert_balanced(eng)


def test_restores_that_fail_are_made_again(monkeypatch):
    """copy=1: every copy fails after it was queued, restores included
    (their blocks are overwritten with garbage before the model reads them)."""
    eng = _run(monkeypatch, "copy=1")
    m = _figures(eng)
    assert m["host_blocks_restored"] > 0 and m["host_copies_redone"] == m["host_copy_failures"] > 0, m
    eng.end_all()
    assert_balanced(eng)


def test_corrupted_slots_are_caught_dropped_and_recomputed(monkeypatch):
    eng = _run(monkeypatch, "corrupt=2", verify=True)
    m = _figures(eng)
    assert eng.worker.store.plan.fired.get("corrupt", 0) > 0
    assert m["host_verify_failures"] > 0 and m["host_verify_dropped_blocks"] >= m["host_verify_failures"], m
    assert m["host_hit_tokens"] > 0, m  # the slots nobody corrupted are still served
    eng.end_all()
    assert_balanced(eng)


def test_corrupted_slots_without_verification_reach_the_model(monkeypatch):
    """Negative control: the same corruption, verification off. The forward's
    byte check must catch it, or the test above proves nothing."""
    with pytest.raises(AssertionError, match="holds wrong KV"):
        _run(monkeypatch, "corrupt=2", verify=False)


def test_corrupted_restores_are_copied_again(monkeypatch):
    eng = _run(monkeypatch, "corrupt_restore=2", verify=True)
    m = _figures(eng)
    assert m["host_restore_mismatches"] > 0 and m["host_copies_redone"] == m["host_restore_mismatches"], m
    eng.end_all()
    assert_balanced(eng)


def test_corrupted_restores_without_verification_reach_the_model(monkeypatch):
    with pytest.raises(AssertionError, match="holds wrong KV"):
        _run(monkeypatch, "corrupt_restore=2", verify=False)


def test_verification_alone_changes_nothing(monkeypatch):
    monkeypatch.delenv("HOSTCACHE_FAULTS", raising=False)
    plain, checked = SimEngine(num_gpu_blocks=24, host_slots=64), SimEngine(num_gpu_blocks=24, host_slots=64,
                                                                            verify=True)
    chat_workload(plain, rounds=4)
    chat_workload(checked, rounds=4)
    a, b = _figures(plain), _figures(checked)
    assert b["host_verify_failures"] == b["host_restore_mismatches"] == 0, b
    # CPU copies complete before the next match: no hit waits for an unfinished save
    assert b["host_verify_unconfirmed_blocks"] == 0 and a["host_hit_tokens"] == b["host_hit_tokens"] > 0, (a, b)
    checked.end_all()
    assert_balanced(checked)


def test_a_pool_lost_mid_run_turns_the_tier_off_and_serving_goes_on(monkeypatch, caplog):
    """Both copy paths fail for a save: the pool is unusable. The scheduler
    stops saving and matching (one line), and every later forward is still
    exact. (A restore of the lost slot matched before the failure is the
    next test's.)"""
    from lmdeploy_patch.fallback_copy import FallbackCopier

    calls = {"n": 0}
    save = FallbackCopier.save

    def failing_save(self, slots, blocks):
        calls["n"] += 1
        raise RuntimeError("host memory is gone")

    monkeypatch.setattr(FallbackCopier, "save", failing_save)
    monkeypatch.setattr("lmdeploy_patch.log._said", set())
    eng = _run(monkeypatch, "queue=5")
    m = _figures(eng)
    assert calls["n"] >= 1 and eng.worker.ledger.lost and m["host_tier_off"] == 1, m
    said = [r.getMessage() for r in caplog.records if "off for the rest of the run" in r.getMessage()]
    assert len(said) == 1, said
    saved = m["host_blocks_saved"]
    chat_workload(eng, seed=9, rounds=2)  # still exact, and nothing more is saved or matched
    assert _figures(eng)["host_blocks_saved"] == saved
    monkeypatch.setattr(FallbackCopier, "save", save)
    eng.end_all()
    assert_balanced(eng)


class _Finished:
    """A save transfer already complete: without an error, or failed with one."""

    def __init__(self, error: str = ""):
        self.error = error

    def done(self) -> bool:
        return True

    def wait(self) -> bool:
        return not self.error


def test_the_ledger_holds_back_unfinished_saves_when_verifying():
    """A slot whose latest save has not reached the rank (or has not
    completed) is not served with verification on: its bytes are older."""
    sums = {}
    ledger = slot_ledger.SlotLedger(4, True, lambda s: sums.get(s, 7), lambda s, b: None)
    ledger.planned(1)
    assert ledger.check(np.array([1], dtype=np.uint32)) == (0, slot_ledger.UNCONFIRMED)

    ledger.submitted(_Finished(), np.array([1], dtype=np.uint32), np.array([3], dtype=np.int32))
    assert ledger.check(np.array([1], dtype=np.uint32)) == (1, "")  # settled and checksummed now
    sums[1] = 8  # the bytes changed in host memory
    assert ledger.check(np.array([1], dtype=np.uint32)) == (0, slot_ledger.MISMATCH)
    ledger.lose("gone")
    assert ledger.check(np.array([1], dtype=np.uint32)) == (0, slot_ledger.LOST)


def test_an_older_failed_save_is_not_redone_over_a_newer_one():
    redone = []
    ledger = slot_ledger.SlotLedger(4, False, lambda s: 0, lambda s, b: redone.append((s.tolist(), b.tolist())))

    slots = np.array([2], dtype=np.uint32)
    ledger.submitted(_Finished("injected"), slots, np.array([5], dtype=np.int32))
    ledger.copied(slots)  # a newer save into the slot finished (the index reused it)
    ledger.settle()
    assert redone == [] and ledger.counts["copy_failures"] == 1
    ledger.submitted(_Finished("injected"), slots, np.array([6], dtype=np.int32))
    ledger.settle()
    assert redone == [([2], [6])] and ledger.counts["copies_redone"] == 1


def test_tier_index_drop_forgets_matched_slots():
    from lmdeploy_hostcache import ROOT_KEY, _core, as_tokens

    ix = _core.TierIndex(8, 4)
    keys = []
    parent = ROOT_KEY
    for b in range(3):
        status, key, slot = ix.reserve(parent, 0, as_tokens(np.arange(4 * b, 4 * b + 4)))
        ix.saved(slot, True)
        parent = key
        keys.append(key)
    _, slots = ix.match(ROOT_KEY, 0, as_tokens(np.arange(12)), True)
    assert len(slots) == 3
    ix.drop(slots[1:])
    ix.release(slots[:1])
    _, again = ix.match(ROOT_KEY, 0, as_tokens(np.arange(12)), False)
    assert list(again) == list(slots[:1]) and ix.used == 1
    ix.check_invariants()
    with pytest.raises(ValueError, match="no match pinned"):
        ix.drop(slots[:1])


def _worker(monkeypatch, spec: str = "", verify: bool = False):
    """One rank's WorkerTier over a small CPU pool, as the agent hook builds it."""
    from types import SimpleNamespace

    import torch

    from lmdeploy_patch.rank_tier import build_worker_tier

    if spec:
        monkeypatch.setenv("HOSTCACHE_FAULTS", spec)
    else:
        monkeypatch.delenv("HOSTCACHE_FAULTS", raising=False)
    monkeypatch.setattr(faults, "_PLANS", {})
    pool = torch.arange(2 * 16 * 64, dtype=torch.int64).to(torch.uint8).reshape(2, 16, 64)
    cc = SimpleNamespace(host_cache_ratio=1.0, host_cache_size=None, host_cache_slots=8, host_cache_verify=verify)
    worker = build_worker_tier(cc, SimpleNamespace(pools=[SimpleNamespace(tensor=pool, entry_axis=1)]), 1)
    worker.ledger.watched = True  # as the scheduler in this process marks it
    return worker, pool


def _plan(pre=(), restore=(), post=()):
    from lmdeploy_patch.copy_plan import HostCopyPlan

    return HostCopyPlan.build(list(pre), list(restore), list(post))


def test_a_restore_matched_before_its_save_was_lost_never_reaches_the_model(monkeypatch):
    """LMDeploy plans forward N+1 while forward N runs, so a slot can be
    matched before N's save into it fails on both paths. The rank then
    refuses to run N+1 rather than let the model read what the slot holds."""
    import torch

    from lmdeploy_patch.fallback_copy import FallbackCopier

    worker, pool = _worker(monkeypatch, "queue=1")  # the engine refuses every copy

    def broken(self, slots, blocks):
        raise RuntimeError("host memory is gone")

    monkeypatch.setattr(FallbackCopier, "save", broken)
    worker.after_model(_plan(post=[(3, 5)]), None)  # forward N's save of block 5 into slot 3: lost
    assert worker.ledger.lost and worker.ledger.unservable(np.array([3], dtype=np.uint32))
    before = pool[:, 9].clone()
    with pytest.raises(RuntimeError, match="a planned restore cannot be carried out: host slot 3 holds no saved"):
        worker.before_model(_plan(restore=[(3, 9)]), None)  # forward N+1, planned before N ran
    assert torch.equal(pool[:, 9], before)  # nothing was copied into the block


def test_a_slot_that_changed_after_its_check_is_named_as_the_cause(monkeypatch):
    """Verification on: the slot matched its checksum when matched, then
    changed in host memory before its restore. Copying it again cannot help:
    the forward fails naming the host memory, not the device."""
    worker, pool = _worker(monkeypatch, verify=True)
    worker.after_model(_plan(post=[(2, 4)]), None)
    worker.before_model(_plan(), None)  # the save is seen complete and checksummed
    assert worker.ledger.check(np.array([2], dtype=np.uint32)) == (1, "")
    np.frombuffer(worker.store.slot_view(2), dtype=np.uint8)[:8] ^= 0xFF
    with pytest.raises(RuntimeError, match="host slot 2 changed after it was checked"):
        worker.before_model(_plan(restore=[(2, 11)]), None)


def test_a_slot_the_ledger_never_heard_of_is_not_served():
    """A store built again under an index that was kept: nothing was saved into it."""
    ledger = slot_ledger.SlotLedger(4, False, lambda s: 0, lambda s, b: None)
    assert ledger.check(np.array([0, 1], dtype=np.uint32)) == (0, slot_ledger.UNKNOWN)
    ledger.planned(0)
    assert ledger.check(np.array([0, 1], dtype=np.uint32)) == (1, slot_ledger.UNKNOWN)


def test_a_failed_save_on_a_gpu_is_a_device_fault():
    """The device orders a GPU rank's copies: by the time the host sees a save
    failed, its block may be rewritten, so it is raised, never redone."""
    redone = []
    ledger = slot_ledger.SlotLedger(4, False, lambda s: 0, lambda s, b: redone.append(s), cuda=True)

    ledger.submitted(_Finished("illegal address"), np.array([1], dtype=np.uint32), np.array([2], dtype=np.int32))
    with pytest.raises(RuntimeError, match="failed on the device"):
        ledger.settle()
    assert redone == []


def test_copy_faults_are_refused_on_a_gpu(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setenv("HOSTCACHE_FAULTS", "copy=2")
    monkeypatch.setattr(faults, "_PLANS", {})
    with pytest.raises(ValueError, match="copy=N is a host-side stand-in"):
        faults.inject(SimpleNamespace(cuda=True, store=None, ledger=None), lambda b: None)


def test_verification_is_refused_when_the_ranks_are_in_other_processes():
    from lmdeploy.pytorch.config import CacheConfig
    from lmdeploy_patch.pool_sizing import size_host_pool

    cc = CacheConfig(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=10)
    cc.host_cache_ratio, cc.host_cache_verify = 1.0, True
    with pytest.raises(ValueError, match="host_cache_verify=True .* ranks in its process"):
        size_host_pool(cc, [1 << 20], None, ranks_here=False)
    size_host_pool(cc, [1 << 20], None, ranks_here=True)
    assert cc.host_cache_slots > 0


def test_a_store_built_again_under_a_kept_index_serves_nothing_it_never_held(monkeypatch):
    """A rank's store rebuilt without a sleep (the scheduler keeps its
    index): its slots are empty. Matches of them are dropped and recomputed,
    exactly (the forward checks every byte), and the blocks are saved again."""
    from types import SimpleNamespace

    from lmdeploy_patch import rank_tier

    monkeypatch.delenv("HOSTCACHE_FAULTS", raising=False)
    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    chat_workload(eng, rounds=2)
    assert eng.tier.index.used > 0
    for sid in list(eng.sessions):  # the conversations come back as new sessions, resending their prompts
        eng.scheduler.end_session(sid)
    eng.sessions.clear()
    assert rank_tier.unregister(eng.cache_engines[0])
    eng.workers[0] = eng.worker = rank_tier.build_worker_tier(
        eng.scheduler.cache_config, SimpleNamespace(pools=[SimpleNamespace(tensor=eng.pool, entry_axis=1)]), 1)
    rank_tier.register(eng.cache_engines[0], eng.worker)
    hits = eng.tier.stats.hit_tokens
    chat_workload(eng, seed=1, rounds=3)  # the same conversations: their host entries are dead now
    assert eng.tier.index.counters()["discarded"] > 0
    chat_workload(eng, seed=1, rounds=3)  # saved again into the new store: served from it
    assert eng.tier.stats.hit_tokens > hits
    eng.end_all()
    assert_balanced(eng)


def test_a_rank_refuses_a_slot_it_never_saved_into():
    ledger = slot_ledger.SlotLedger(4, False, lambda s: 0, lambda s, b: None)
    assert "never saved into" in ledger.unservable(np.array([2], dtype=np.uint32))
    ledger.copied(np.array([2], dtype=np.uint32))
    assert ledger.unservable(np.array([2], dtype=np.uint32)) is None
