"""lmdeploy.pytorch.paging.prefill_scheduler._TentativePrefixMatch.rollback:
admission failed, the sequence gives its blocks back; the tier drops the
slot pins of a restore that will never be planned, and treats the release
inside the rollback as no reclaim (nothing computed is given back)."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.paging.prefill_scheduler", "_TentativePrefixMatch.rollback", ["self", "reason"])
def rollback(original: Callable, self: Any, reason: Any) -> Any:
    from ..scheduler_tier import tier_of

    tier = tier_of(self.block_trie)
    if tier is None:
        return original(self, reason)
    tier.cancel(self.seq)
    # A rollback's release gives back tentative state, not computed KV: no tail to save.
    with tier.rolling_back(self.seq):
        return original(self, reason)
