"""Restore or recompute (lmdeploy_patch/restore_decision.py): the estimate on
both sides of the break-even point, the policies, the prefill rate learned
from timed forwards, and the decision inside the real scheduler."""
from __future__ import annotations

import pytest

pytest.importorskip("lmdeploy")

from lmdeploy_patch.restore_decision import DEFAULT_PREFILL_TOK_S, MIN_SAMPLES, RestoreDecider  # noqa: E402
from benchmark.sim_engine import SimEngine  # noqa: E402
from test_scheduler_tier import assert_balanced, chat_workload  # noqa: E402

BLOCK = 1 << 20  # bytes per block and rank
BS = 64          # tokens per block


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def decide(d: RestoreDecider, blocks: int, tokens: int, seq_id: int = 0) -> int:
    """One admission's decision, the sequence then run (its decision counts)."""
    n = d.restore_blocks(seq_id, blocks, tokens)
    d.commit(seq_id)
    return n


def measured(policy: str = "auto", gbps: float = 10.0, tok_s: float = 10_000.0) -> tuple[RestoreDecider, Clock]:
    clock = Clock()
    d = RestoreDecider(policy, BLOCK, BS, clock=clock)
    d.set_copy_bandwidth(gbps * 1e9)
    for _ in range(MIN_SAMPLES):
        d.observe_prefill(1000, 1000 / tok_s)
    return d, clock


def test_restores_when_the_copy_is_faster():
    # 8 blocks: 8 MiB at 10 GB/s = 0.84 ms; 512 tokens at 10K tok/s = 51 ms
    d, _ = measured()
    restore, recompute = d.estimate(8, 8 * BS)
    assert decide(d, 8, 8 * BS) == 8
    assert d.stats.restores_chosen == 1 and d.stats.recomputes_chosen == 0
    assert restore == pytest.approx(8 * BLOCK / 10e9) and recompute == pytest.approx(8 * BS / 10_000)
    assert d.stats.est_saved_seconds == pytest.approx(recompute - restore)


def test_recomputes_when_prefill_is_faster_than_the_copy():
    # 1 MiB per 64 tokens at 0.01 GB/s = 105 ms; at 10K tok/s = 6.4 ms
    d, _ = measured(gbps=0.01)
    assert decide(d, 4, 4 * BS) == 0
    assert d.stats.recomputes_chosen == 1 and d.stats.recompute_chosen_tokens == 4 * BS
    restore, recompute = d.estimate(4, 4 * BS)
    assert d.stats.est_saved_seconds == pytest.approx(restore - recompute)


def test_break_even_point():
    """Per block: copy BLOCK/bw against BS/rate. Just below the rate at which
    they are equal, restore; just above it, recompute."""
    gbps = 10.0
    even = BS / (BLOCK / (gbps * 1e9))  # tokens/s at which one block costs the same both ways
    below, _ = measured(gbps=gbps, tok_s=even * 0.99)
    above, _ = measured(gbps=gbps, tok_s=even * 1.01)
    assert decide(below, 16, 16 * BS) == 16
    assert decide(above, 16, 16 * BS) == 0


def test_backlog_tips_a_small_hit_to_recompute():
    d, clock = measured(gbps=10.0, tok_s=100_000.0)
    one = d.estimate(1, BS)
    assert one[0] < one[1]  # alone, one block restores (0.1 ms against 0.64 ms)
    assert decide(d, 64, 64 * BS, seq_id=7) == 64  # 64 MiB queued: 6.7 ms of backlog
    assert d.backlog_s() == pytest.approx(64 * BLOCK / 10e9)
    assert decide(d, 1, BS) == 0
    # a hit big enough to pay for the wait still restores
    assert decide(d, 256, 256 * BS) == 256
    clock.t += 1.0  # the stream drained
    assert d.backlog_s() == 0 and decide(d, 1, BS) == 1


def test_policies_override_the_estimate():
    always, _ = measured("always", gbps=0.001)
    assert decide(always, 4, 4 * BS) == 4
    never, _ = measured("never", gbps=1000.0)
    assert decide(never, 4, 4 * BS) == 0 and never.stats.recomputes_chosen == 1
    with pytest.raises(ValueError, match="host_cache_restore_policy must be one of"):
        RestoreDecider("sometimes", BLOCK, BS)


def test_restores_until_it_has_measured_both_figures():
    d = RestoreDecider("auto", BLOCK, BS)
    assert decide(d, 4, 4 * BS) == 4  # no bandwidth: restore, as before the decision existed
    d.set_copy_bandwidth(0.001e9)  # would make recomputing win...
    for _ in range(MIN_SAMPLES - 1):
        d.observe_prefill(1000, 0.001)
    assert d.estimate(4, 4 * BS)[1] == pytest.approx(4 * BS / DEFAULT_PREFILL_TOK_S)
    assert decide(d, 4, 4 * BS) == 4  # ...but the prefill rate is not learned yet
    d.observe_prefill(1000, 0.001)
    assert d.measured and decide(d, 4, 4 * BS) == 0


def test_prefill_rate_is_token_weighted():
    d = RestoreDecider("auto", BLOCK, BS)
    d.observe_prefill(4096, 0.1)  # 40,960 tok/s
    d.observe_prefill(4, 0.01)    # 400 tok/s, a tiny forward dominated by its fixed cost
    assert d.prefill_tok_s > 40_000
    d.observe_prefill(0, 1.0)     # ignored
    d.observe_prefill(10, 0.0)
    assert d.samples == 2


def test_a_rolled_back_admission_counts_once_and_gives_its_backlog_back():
    d, clock = measured(gbps=10.0, tok_s=10_000.0)
    for _ in range(3):  # LMDeploy's tentative matches, each rolled back
        assert d.restore_blocks(5, 8, 8 * BS) == 8
        d.rollback(5)
    assert d.backlog_s() == 0 and d.stats.restores_chosen == 0
    assert decide(d, 8, 8 * BS, seq_id=5) == 8
    assert d.stats.restores_chosen == 1
    assert d.stats.est_saved_seconds == pytest.approx(8 * BS / 10_000 - 8 * BLOCK / 10e9)


def test_estimated_losses_are_counted_apart():
    d, _ = measured("always", gbps=0.01)  # restores that were estimated to cost more
    decide(d, 4, 4 * BS)
    assert d.stats.est_saved_seconds == 0 and d.stats.est_lost_seconds > 0


@pytest.mark.parametrize("gbps,restored", [(1e-6, False), (100.0, True)], ids=["slow-copy", "fast-copy"])
def test_decision_inside_the_scheduler(gbps, restored):
    """With a copy estimated slower than the prefill, every host hit is
    recomputed (and every forward still reads exact bytes: sim_engine), the
    pins are dropped and the tokens are counted as lost by choice."""
    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    clock = Clock()
    eng.tier.decider.assume(gbps * 1e9, 50_000.0, clock)
    chat_workload(eng, rounds=4)
    s = eng.tier.metrics()
    if restored:
        assert s["host_hit_tokens"] > 0 and s["host_recomputes_chosen"] == 0 and s["host_restores_chosen"] > 0
        assert s["host_lost_recomputed_by_choice_tokens"] == 0
    else:
        assert s["host_hit_tokens"] == 0 and s["host_blocks_restored"] == 0
        assert s["host_recomputes_chosen"] > 0
        assert s["host_lost_recomputed_by_choice_tokens"] == s["host_recompute_chosen_tokens"] > 0
    eng.end_all()
    assert_balanced(eng)


def test_never_restores_and_stays_exact():
    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    eng.tier.decider.policy = "never"
    off = SimEngine(num_gpu_blocks=24)
    chat_workload(eng)
    chat_workload(off)
    s = eng.tier.metrics()
    assert s["host_blocks_restored"] == 0 and s["host_recomputes_chosen"] > 0
    assert eng.stats.tokens_computed == off.stats.tokens_computed  # as if the tier were off
    eng.end_all()
    off.end_all()
    assert_balanced(eng)


def test_rolled_back_admissions_count_their_decision_once_in_the_scheduler():
    """LMDeploy retries an admission that did not fit: the decision of the
    one that runs counts, not every attempt's (scheduler_tier.cancel)."""
    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    eng.tier.decider.assume(100e9, 50_000.0, Clock())
    chat_workload(eng, rounds=4, concurrent=True)  # concurrent turns roll admissions back
    s = eng.tier.metrics()
    assert s["host_restores_chosen"] > 0
    # one decision per admission that restored: each restored at least one block
    assert s["host_restores_chosen"] <= s["host_blocks_restored"] + eng.tier.stats.restores_skipped
    assert eng.tier.restore_size.count == s["host_restores_chosen"]
    eng.end_all()
    assert_balanced(eng)


def test_rank_calibration_and_prefill_timing_on_cpu():
    """The rank side of the decision (rank_tier.WorkerTier), on a CPU store:
    the calibration measures a rate and leaves every block's bytes as they
    were; a prefill forward gives one sample, a decode none."""
    import torch

    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    worker = eng.worker
    eng.pool.copy_(torch.randint(0, 255, eng.pool.shape, dtype=torch.uint8))
    before = eng.pool.clone()
    rate = worker.calibrate_restore(24)
    assert rate is not None and rate > 0 and worker.restore_bytes_per_s == rate
    assert torch.equal(eng.pool, before)
    worker.forward_starts(100, prefill=True, stream=None)
    worker.forward_ends(stream=None)
    worker.forward_starts(4, prefill=False, stream=None)
    worker.forward_ends(stream=None)
    samples = worker.take_prefill_samples()
    assert len(samples) == 1 and samples[0][0] == 100 and samples[0][1] > 0
    assert worker.take_prefill_samples() == []
    eng.end_all()
