"""The lost-hit books (lmdeploy_patch/lost_hits.py) on their own."""
from __future__ import annotations

from lmdeploy_patch.lost_hits import CAUSES, LostHits


def test_a_chain_loss_stops_at_the_first_block_never_computed_and_names_the_first_cause():
    books = LostHits()
    for key in (1, 2, 3, 5):
        books.computed(key)
    books.saved(2)
    books.dropped(3)
    assert books.chain_loss([1, 2, 3, 4, 5]) == (3, "never_saved")
    assert books.chain_loss([2, 3, 4, 5]) == (2, "evicted_from_host")
    assert books.chain_loss([3]) == (1, "save_dropped")
    assert books.chain_loss([4, 5]) == (0, None)


def test_losses_count_once_the_sequence_runs_and_never_after_a_rollback():
    books = LostHits()
    books.note(7, "evicted_from_host", 128)
    books.rollback(7)
    books.note(7, "evicted_from_host", 64)
    books.commit(7)
    books.commit(7)  # nothing pending any more
    assert books.metrics() == {f"host_lost_{c}_tokens": (64 if c == "evicted_from_host" else 0) for c in CAUSES}


def test_the_shadow_is_bounded_and_forgets_the_oldest_first():
    books = LostHits(shadow_keys=2)
    for key in (1, 2, 3):
        books.computed(key)
    assert books.chain_loss([1]) == (0, None) and books.chain_loss([2, 3]) == (2, "never_saved")
