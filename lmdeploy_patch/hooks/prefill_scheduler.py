"""lmdeploy.pytorch.paging.prefill_scheduler._TentativePrefixMatch.rollback:
admission failed, the sequence gives its blocks back; the tier drops the
slot pins of a restore that will never be planned; when one was planned,
the release inside the rollback saves no tail (its step is past KV that
never landed)."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.paging.prefill_scheduler", "_TentativePrefixMatch.rollback", ["self", "reason"])
def rollback(original: Callable, self: Any, reason: Any) -> Any:
    from ..scheduler_tier import tier_of

    tier = tier_of(self.block_trie)
    if tier is None:
        return original(self, reason)
    # With a host hit planned, the step is past KV that never landed: the
    # rollback's release must save no tail. Without one, what it releases is
    # computed KV (a preempted sequence's own blocks), whose tail is worth keeping.
    tentative = tier.has_pending_restore(self.seq)
    tier.cancel(self.seq)
    with tier.rolling_back(self.seq, tentative):
        return original(self, reason)
