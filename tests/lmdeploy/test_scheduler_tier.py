"""The host tier inside LMDeploy 0.18.0's real scheduler and block trie,
multi-turn sessions under GPU-memory pressure, on CPU (see benchmark/sim_engine.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("lmdeploy")

from benchmark.sim_engine import SimEngine  # noqa: E402

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
    from balance import balance_problems

    problems = balance_problems(eng.scheduler, eng.tier)
    assert not problems, problems


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
    assert st.tails_saved > 0 and st.tail_hit_tokens > 0, st  # open sessions' partial blocks came back
    # a session tail's slot holds tail tokens, not a whole block
    assert st.hit_tokens == (st.blocks_restored + st.restores_skipped - st.tails_planned) * bs + st.tail_hit_tokens
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
    repo = os.path.dirname(os.path.dirname(os.path.abspath(HERE)))
    code = (f"import sys, json; sys.path[:0] = [{HERE!r}, {repo!r}]; import test_scheduler_tier as t; "
            "import lmdeploy_patch; assert not lmdeploy_patch.status()['applied']; print(json.dumps(t._trace(0)))")
    env = dict(os.environ, LMDEPLOY_HOSTCACHE_DISABLE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    unpatched = json.loads(out.stdout.strip().splitlines()[-1])
    assert json.loads(json.dumps(patched)) == unpatched


def _evicted_prefix(eng: SimEngine, prefix_blocks: int = 5, flood: int = 10) -> np.ndarray:
    """A prompt that session 100 computed (so the host holds it) and that
    later sessions pushed out of the GPU trie."""
    rng = np.random.default_rng(7)
    prompt = rng.integers(100, 200, size=prefix_blocks * eng.bs + 3)
    eng.turn(100, prompt, decode_steps=2)
    eng.scheduler.end_session(100)
    eng.sessions.pop(100)
    for sid in range(101, 101 + flood):
        eng.turn(sid, rng.integers(1000, 30000, size=6 * eng.bs), decode_steps=2)
        eng.scheduler.end_session(sid)
        eng.sessions.pop(sid)
    return prompt


def _admit(eng: SimEngine, sid: int, tokens: np.ndarray, **sampling):
    import torch
    from lmdeploy.pytorch.messages import SamplingParam

    seq = eng.scheduler.add_session(sid).add_sequence(torch.from_numpy(tokens),
                                                      sampling_param=SamplingParam(**sampling))
    eng.sessions[sid] = seq
    out = eng.scheduler.schedule(is_prefill=True, prealloc_size=0)
    assert seq in out.running
    return seq, out.running


def test_router_replay_requests_skip_the_host_tier():
    """LMDeploy replays routed experts from trie nodes and stops its own match
    where a node has none; host entries have none, so such a request must not
    take host hits (its routed-expert history would be short)."""
    for replay, want in ((False, 5), (True, 0)):
        eng = SimEngine(num_gpu_blocks=24, host_slots=256)
        prompt = _evicted_prefix(eng)
        hits = eng.tier.stats.hit_tokens
        seq, running = _admit(eng, 200, prompt, return_routed_experts=replay)
        assert seq.num_history_ids == want * eng.bs and eng.tier.stats.hit_tokens == hits + want * eng.bs
        eng._finish_prefill(running, decode_steps=1)
        eng.end_all()
        assert_balanced(eng)


def test_rollback_undoes_host_lookup_figures():
    """A rolled-back match's host lookups are undone like LMDeploy's own
    statistics, so a retried match does not count them twice."""
    eng = SimEngine(num_gpu_blocks=24, host_slots=256)
    prompt = _evicted_prefix(eng)
    st = eng.tier.stats
    q0, h0 = st.queried_tokens, st.hit_tokens
    seq = eng.scheduler.add_session(300).add_sequence(__import__("torch").from_numpy(prompt))
    eng.sessions[300] = seq
    from lmdeploy.pytorch.paging.prefill_scheduler import _TentativePrefixMatch

    tm = _TentativePrefixMatch(seq, eng.scheduler.block_trie, eng.scheduler.block_manager, is_ssm=False,
                               preserve_existing_state=False)
    tm.match()
    assert st.hit_tokens > h0 and st.queried_tokens > q0 and eng.tier.has_pending_restore(seq)
    tm.rollback("test")
    assert (st.queried_tokens, st.hit_tokens) == (q0, h0) and not eng.tier.has_pending_restore(seq)
    assert seq.num_history_ids == 0
    out = eng.scheduler.schedule(is_prefill=True, prealloc_size=0)
    eng._finish_prefill(out.running, decode_steps=1)
    assert st.hit_tokens == h0 + 5 * eng.bs
    eng.end_all()
    assert_balanced(eng)


def test_wait_for_earlier_saves_only_after_an_eviction():
    eng = SimEngine(num_gpu_blocks=64, host_slots=64)
    rng = np.random.default_rng(3)
    eng.turn(0, rng.integers(100, 200, size=40), decode_steps=0)  # no pressure: nothing evicted
    plan = eng.tier.take_plan([])
    assert not plan.wait_saves
    small = SimEngine(num_gpu_blocks=24, host_slots=64)
    _evicted_prefix(small)
    # every eviction sets the flag, whatever the policy; a plan clears it
    small.tier.on_evict(next(iter(small.scheduler.block_trie.leaves)))
    assert small.tier.take_plan([]).wait_saves and not small.tier.take_plan([]).wait_saves
    eng.end_all()
    small.end_all()


def test_sleep_forgets_the_host_entries():
    """Sleep releases the pools (the ranks drop their stores) and the weights
    may change: the scheduler's index starts empty, and serving stays exact
    with the new, empty store."""
    import asyncio
    from types import SimpleNamespace

    from lmdeploy.pytorch.engine.engine import Engine
    from lmdeploy_patch import rank_tier

    eng = SimEngine(num_gpu_blocks=24, host_slots=256)
    prompt = _evicted_prefix(eng)
    assert eng.tier.index.used > 0
    slept = []

    async def executor_sleep(level):
        slept.append(level)

    fake = SimpleNamespace(_block_new_inputs=lambda: None, _engine_loop=None,
                           _cancel_and_end_all_sessions=lambda: None,
                           executor=SimpleNamespace(sleep=executor_sleep), scheduler=eng.scheduler)
    asyncio.run(Engine.sleep(fake, 1))  # LMDeploy's Engine.sleep with our wrapper
    assert slept == [1] and eng.tier.index.used == 0
    # the rank side after wakeup: a new store over the (re-allocated) pools
    assert rank_tier.unregister(eng.cache_engines[0])
    eng.pool.zero_()
    eng.worker = rank_tier.build_worker_tier(eng.scheduler.cache_config, SimpleNamespace(
        pools=[SimpleNamespace(tensor=eng.pool, entry_axis=1)]), blocks_per_logical=1)
    rank_tier.register(eng.cache_engines[0], eng.worker)
    # The tier's sleep hook emptied LMDeploy's trie (whose blocks outlived their pools)
    assert all(not root.children for root in eng.scheduler.block_trie._roots.values())
    for sid in list(eng.sessions):
        eng.scheduler.end_session(sid)
    eng.sessions.clear()
    hits = eng.tier.stats.hit_tokens
    eng.turn(400, prompt, decode_steps=1)  # recomputed (nothing matched), and saved again
    assert eng.tier.stats.hit_tokens == hits
    chat_workload(eng, seed=5)
    eng.end_all()
    assert_balanced(eng)


def test_every_payload_with_model_work_carries_the_plan():
    """LMDeploy's real _ForwardInputsTask._build_payload (hooked): a prefill
    payload and a decode (delta-only) payload carry the plan, and the plan
    holds the restores of exactly the sequences of that payload; a payload
    without model work (connector polling) takes nothing."""
    from types import SimpleNamespace

    from lmdeploy.pytorch.engine.inputs_maker import _ForwardInputsResult, _ForwardInputsTask
    from lmdeploy.pytorch.messages import UpdateTokenMode
    from lmdeploy_patch.copy_plan import HostCacheInputs

    eng = SimEngine(num_gpu_blocks=24, host_slots=256)
    prompt = _evicted_prefix(eng)
    maker = SimpleNamespace(scheduler=eng.scheduler, spec_decoding=False,
                            sampling_strategy=SimpleNamespace(make_sampling_inputs=lambda running: None),
                            model_agent_strategy=SimpleNamespace(make_stopping_criteria=lambda running: None))

    def payload(running, inputs=None, delta=None):
        task = _ForwardInputsTask(maker, prefill=inputs is not None)
        task.result = _ForwardInputsResult(running=running, inputs=inputs, delta=delta)
        return task._build_payload()

    seq, running = _admit(eng, 500, prompt)
    assert eng.tier.has_pending_restore(seq)
    idle = payload([])  # connector-only: no model work, nothing taken
    assert idle["cache_inputs"] is None and eng.tier.has_pending_restore(seq)
    p = payload(running, inputs=SimpleNamespace())
    ci = p["cache_inputs"]
    assert isinstance(ci, HostCacheInputs) and len(ci.host_plan.restore_slots) == 5
    assert not eng.tier.has_pending_restore(seq)
    eng.scheduler.activate_seqs(running)
    eng.forward(running, plan=ci.host_plan)  # the restored blocks hold exactly the right bytes
    seq.update_token_ids(np.array([eng._token()]), mode=UpdateTokenMode.PREFILL)
    for _ in range(2 * eng.bs):  # decode across block boundaries: attaches, hence post saves
        assert all(eng.scheduler.schedule_running(running, num_required_tokens=1, prealloc_size=1))
        d = payload(running, delta=SimpleNamespace())
        assert isinstance(d["cache_inputs"], HostCacheInputs)
        eng.forward(running, plan=d["cache_inputs"].host_plan)
        seq.update_token_ids(np.array([eng._token()]), mode=UpdateTokenMode.DECODE)
    assert eng.worker.blocks_saved >= 2
    seq.finish()
    eng.end_all()
    assert_balanced(eng)


def test_restores_overlap_the_forward_in_flight_unless_it_uses_their_blocks():
    """restore_after_forward is set exactly when a restore writes a block of
    the previous two batches (a forward in flight may still use it) or a
    block the plan saves first; otherwise the restore overlaps that forward."""
    import numpy as np

    eng = SimEngine(num_gpu_blocks=24, host_slots=64, policy="write_through")
    alloc = eng.scheduler.block_manager.allocator
    batches: list[set] = [set(), set()]
    plans = []
    take = eng.tier.take_plan

    def recording_take(running):
        plan = take(running)
        plans.append((plan, batches[-1] | batches[-2]))
        batches.append({int(b) for seq in running
                        for b in alloc.get_physical_blocks(np.asarray(seq.logical_blocks.get_real_blocks()))})
        return plan

    eng.tier.take_plan = recording_take
    chat_workload(eng, rounds=4)
    with_restores = [(p, busy) for p, busy in plans if len(p.restore_slots)]
    assert with_restores
    for plan, busy in with_restores:
        pre = {int(b) for b in plan.pre_blocks}
        expect = any(int(b) in busy or int(b) in pre for b in plan.restore_blocks)
        assert plan.restore_after_forward == expect
    assert any(not p.restore_after_forward for p, _ in with_restores), "no restore could overlap a forward"


def test_every_rank_executes_the_same_plans():
    """Tensor parallelism: one index on the scheduler, one store per rank with
    its own shard of every block, the same slot ids everywhere."""
    eng = SimEngine(num_gpu_blocks=24, host_slots=64, ranks=2)
    chat_workload(eng, rounds=3)  # each forward checks both ranks' shards
    assert len(eng.workers) == 2
    assert eng.tier.metrics()["host_blocks_restored"] > 0
    assert eng.workers[0].blocks_restored == eng.workers[1].blocks_restored == eng.tier.stats.blocks_restored
    assert eng.workers[0].blocks_saved == eng.workers[1].blocks_saved > 0
    eng.end_all()
    assert_balanced(eng)


def test_only_running_sequences_count_as_preempted():
    """LMDeploy's engine loop also hands sequences that just finished to
    preempt_seqs (its running list lags a step): they are not preemptions,
    and an ended session keeps no state in the tier."""
    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    chat_workload(eng, rounds=2)
    stopped = list(eng.scheduler.hanging)
    assert stopped
    eng.scheduler.preempt_seqs(stopped)
    assert not [s.seq_id for s in stopped if eng.tier._released.get(s.seq_id, (0, False))[1]]
    eng.end_all()
    assert_balanced(eng)


def _stateless_turn(eng: SimEngine, sid: int, prompt: np.ndarray, steps: int = 3) -> np.ndarray:
    """One request in its own session, ended after its reply (LMDeploy's
    server); returns the history a next turn would resend."""
    seq = eng.turn(sid, prompt, decode_steps=steps)
    history = np.asarray(seq.history_cache[:seq.num_all_ids]).copy()
    eng.scheduler.end_session(sid)
    eng.sessions.pop(sid)
    return history


def test_selective_saves_evictions_only_while_turns_are_continued():
    """write_through_selective (scheduler_tier module docstring): one-off
    requests stop moving bytes once the warm-up is over; when conversations
    continue, evicted blocks are saved again and come back from host."""
    from lmdeploy_patch import continuations

    eng = SimEngine(num_gpu_blocks=24, host_slots=256, policy="write_through_selective")
    eng.tier.save_stopped_tails = False  # sessions end with each request here
    rng = np.random.default_rng(5)
    sid = 0
    for _ in range(continuations.WARMUP):
        _stateless_turn(eng, sid, rng.integers(1000, 30000, size=40))
        sid += 1
    saved = eng.tier.stats.blocks_saved
    for _ in range(40):
        _stateless_turn(eng, sid, rng.integers(1000, 30000, size=40))
        sid += 1
    assert eng.tier.continuations.rate() == 0 and not eng.tier.continuations.likely()
    assert eng.tier.stats.blocks_saved == saved, "one-off requests' evicted blocks were saved"
    # Chats: each next turn resends its history; the small GPU cache evicts
    # between turns, so what comes back from host was saved at eviction.
    histories = {c: rng.integers(1000, 30000, size=50) for c in range(8)}
    for _ in range(10):  # the rate is decayed slowly: the one-offs still weigh
        for c in histories:
            histories[c] = np.concatenate([_stateless_turn(eng, sid, histories[c]),
                                           rng.integers(1000, 30000, size=20)])
            sid += 1
    assert eng.tier.continuations.likely(), eng.tier.continuations.rate()
    assert eng.tier.stats.blocks_saved > saved and eng.tier.stats.hit_tokens > 0
    eng.end_all()
    assert_balanced(eng)


def test_open_sessions_count_as_continued():
    """A session kept open ends its turns mid-block; its next turn is a
    continuation all the same (continuations.py), so the selective policy
    keeps saving what the GPU evicts after the warm-up."""
    from lmdeploy_patch import continuations

    eng = SimEngine(num_gpu_blocks=24, host_slots=256, policy="write_through_selective")
    rng = np.random.default_rng(9)
    rounds = continuations.WARMUP // 2 + 4
    for _ in range(rounds):
        for sid in range(2):
            eng.turn(sid, rng.integers(1000, 30000, size=int(rng.integers(2, 6))), decode_steps=1)
    c = eng.tier.continuations
    assert c.seen == 2 * rounds and c.seen > continuations.WARMUP
    assert c.rate() > 0.8 and c.likely(), c.rate()  # all but each session's first turn
    eng.end_all()
    assert_balanced(eng)

