"""TierIndex: the tier's rules over its prefix index, the ones both the
single-process HostCache and LMDeploy's scheduler side keep (tier_index.h;
docs/host_tier.md, contracts)."""
from __future__ import annotations

import numpy as np
import pytest

from lmdeploy_hostcache import ROOT_KEY, _core

BT = 4


def blocks(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=n * BT, dtype=np.int32)


def save_chain(tier, tokens, ok=True) -> list[int]:
    parent, slots = ROOT_KEY, []
    for b in range(len(tokens) // BT):
        status, parent, slot = tier.reserve(parent, 0, tokens[b * BT:(b + 1) * BT])
        assert status == "created"
        assert tier.pins(slot) == 1 and not tier.is_ready(slot)  # pending: pinned, not matchable
        tier.saved(slot, ok)
        slots.append(slot)
    return slots


def test_a_slot_is_matchable_once_its_save_is_settled():
    tier = _core.TierIndex(8, BT)
    tokens = blocks(3)
    status, key, slot = tier.reserve(ROOT_KEY, 0, tokens[:BT])
    assert status == "created" and len(tier.match(ROOT_KEY, 0, tokens)[1]) == 0
    tier.saved(slot, True)
    keys, slots = tier.match(ROOT_KEY, 0, tokens)
    assert list(slots) == [slot] and keys[0] == key and tier.pins(slot) == 0


def test_a_failed_save_is_never_matched_and_leaves_no_pin():
    tier = _core.TierIndex(8, BT)
    slots = save_chain(tier, blocks(2), ok=False)
    assert len(tier.match(ROOT_KEY, 0, blocks(2))[1]) == 0
    assert all(tier.pins(s) == 0 for s in slots) and tier.counters()["discarded"] == 2
    tier.check_invariants()


def test_a_restore_takes_the_match_pins_over_and_releases_them_when_settled():
    tier = _core.TierIndex(8, BT)
    tokens = blocks(3)
    save_chain(tier, tokens)
    _, slots = tier.match(ROOT_KEY, 0, tokens, True)
    assert len(slots) == 3 and all(tier.pins(s) == 1 for s in slots)
    tier.begin_restore(slots, True)
    assert all(tier.pins(s) == 2 for s in slots)
    tier.restored(slots, True, True)
    assert all(tier.pins(s) == 0 for s in slots) and len(tier.match(ROOT_KEY, 0, tokens)[1]) == 3


def test_a_corrupt_restore_drops_the_block():
    tier = _core.TierIndex(8, BT)
    tokens = blocks(2)
    save_chain(tier, tokens)
    _, slots = tier.match(ROOT_KEY, 0, tokens, True)
    tier.begin_restore(slots, True)
    tier.restored(slots[:1], True, True)
    tier.restored(slots[1:], False, True)
    assert len(tier.match(ROOT_KEY, 0, tokens)[1]) == 1  # the prefix up to the corrupt block survives
    tier.check_invariants()


def test_bad_calls_are_refused_and_change_nothing():
    tier = _core.TierIndex(8, BT)
    tokens = blocks(2)
    slots = save_chain(tier, tokens)
    with pytest.raises(ValueError, match="that no match pinned"):
        tier.release(np.array(slots, dtype=np.uint32))
    with pytest.raises(ValueError, match="not pinned by a match"):
        tier.begin_restore(np.array(slots, dtype=np.uint32), True)
    with pytest.raises(ValueError, match="holds no ready block"):
        tier.begin_restore(np.array([slots[0], 7], dtype=np.uint32), False)
    assert all(tier.pins(s) == 0 for s in slots)  # validated before anything was pinned
    with pytest.raises(ValueError, match="one block of 4 tokens"):
        tier.reserve(ROOT_KEY, 0, tokens)
    with pytest.raises(ValueError, match="out of range"):
        tier.pins(10**6)
    with pytest.raises(ValueError, match="holds no reserved save"):
        tier.saved(slots[0], True)  # already settled
    _, matched = tier.match(ROOT_KEY, 0, tokens, True)
    with pytest.raises(ValueError, match="settle only restores begun with begin_restore"):
        tier.restored(matched, False, True)  # only the match's pins: nothing to settle
    assert len(tier.match(ROOT_KEY, 0, tokens)[1]) == 2 and all(tier.pins(s) == 1 for s in matched)
