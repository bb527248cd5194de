"""lmdeploy.pytorch.paging.seq_states.states.SequenceLifecycle.release_paging_resources:
a sequence's blocks go back (the scheduler reclaiming them under memory
pressure, an admission rollback's reset, end_session); the tier drops the
slot pins of a restore that will never be planned."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.paging.seq_states.states", "SequenceLifecycle.release_paging_resources", ["self", "seq"])
def release_paging_resources(original: Callable, self: Any, seq: Any) -> Any:
    from ..scheduler_tier import tier_of

    tier = tier_of(self)
    if tier is not None:
        tier.cancel(seq)
    return original(self, seq)
