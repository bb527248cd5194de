"""The soak (benchmark/soak.py), short: hundreds of turns through LMDeploy
0.18.0's real scheduler and the host tier with cancellations, preemptions
and sleep/wakeup cycles, every step checked (slot states, ledgers, state
kept for gone sequences), every byte a forward reads checked, and at the end
balance, bounded memory and counters that add up."""
from __future__ import annotations

import pytest

pytest.importorskip("lmdeploy")

from benchmark import soak  # noqa: E402


def _assert_clean(out: dict) -> None:
    assert out["problems"] == [] and out["wrong"] == {}, (out["problems"], out["wrong"])
    assert out["rss_ok"], (out["rss_growth_mib"], out["rss_bound_mib"])
    c = out["counts"]
    # the run met what it is for
    assert c["cancelled"] > 0 and c["preempted"] > 0 and c["sleeps"] >= 2, c
    assert c["host_hit_tokens_seen"] > 0 and out["host"]["host_evictions"] > 0, (c, out["host"])


@pytest.mark.parametrize("policy,ranks", [("write_through", 1), ("write_back", 1), ("write_through_selective", 2)])
def test_short_soak_stays_exact_balanced_and_bounded(monkeypatch, policy, ranks):
    monkeypatch.delenv("HOSTCACHE_FAULTS", raising=False)
    _assert_clean(soak.run(300, seed=1, sleep_every=150, policy=policy, ranks=ranks))


def test_short_soak_with_faults_and_verification(monkeypatch):
    from lmdeploy_patch import faults

    monkeypatch.setenv("HOSTCACHE_FAULTS", "chunk=11,queue=7,copy=5,corrupt=9,corrupt_restore=6")
    monkeypatch.setattr(faults, "_PLANS", {})
    out = soak.run(300, seed=2, sleep_every=150, verify=True)
    _assert_clean(out)
    host = out["host"]
    # each fault was met: refused and failed copies made again, corrupted slots and restored blocks caught
    assert host["host_verify_failures"] > 0 and host["host_restore_mismatches"] > 0, host
    assert host["host_copy_failures"] > 0 and host["host_copies_redone"] >= host["host_copy_failures"], host


def test_the_step_checks_can_fail(monkeypatch):
    """Negative control: a tier that forgets to give back the pins of a
    match it drops leaves pinned slots between steps, and the soak says so."""
    from lmdeploy_patch.scheduler_tier import HostTier

    cancel = HostTier.cancel

    def leaky_cancel(self, seq):
        pending = self._restores.get(seq.seq_id)
        if pending is not None:
            pending.slots = pending.slots[:0]  # its slots' pins are never given back
        cancel(self, seq)

    monkeypatch.delenv("HOSTCACHE_FAULTS", raising=False)
    monkeypatch.setattr(HostTier, "cancel", leaky_cancel)
    with pytest.raises(AssertionError, match="pins, but 0 pending restores hold it"):
        soak.run(300, seed=1, sleep_every=150)
