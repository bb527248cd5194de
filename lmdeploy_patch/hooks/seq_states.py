"""lmdeploy.pytorch.paging.seq_states.states.SequenceLifecycle:

- release_paging_resources: a sequence's blocks go back (the scheduler
  reclaiming a waiting or stopped sequence's blocks under memory pressure,
  a preempted one's included: preempt_seqs keeps them until then; an
  admission rollback's reset; the session's removal). On a reclaim (and a
  rollback that undoes no host hit: hooks/prefill_scheduler.py) the tier
  first saves the sequence's partial last block (its session tail,
  scheduler_tier.py) while the block is still the sequence's, then drops
  the slot pins of a restore that will never be planned.
- remove_sequence: the session ends; its tail is not worth a copy, and the
  tier forgets it.
- RunningState.finish: a turn ended (RUNNING to STOPPED); the selective
  write policy learns from it where a conversation may continue
  (scheduler_tier.HostTier.on_turn_end). Only reads the sequence.
"""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.pytorch.paging.seq_states.states", "SequenceLifecycle.release_paging_resources", ["self", "seq"])
def release_paging_resources(original: Callable, self: Any, seq: Any) -> Any:
    from ..scheduler_tier import tier_of

    tier = tier_of(self)
    if tier is not None:
        tier.on_release(seq)
    return original(self, seq)


@wrap("lmdeploy.pytorch.paging.seq_states.states", "RunningState.finish", ["self"])
def finish(original: Callable, self: Any) -> Any:
    result = original(self)
    from ..scheduler_tier import tier_of

    tier = tier_of(self.lifecycle)
    if tier is not None:
        from lmdeploy.pytorch.messages import MessageStatus

        if self.seq.status == MessageStatus.STOPPED:  # not a migration's hand-off
            tier.on_turn_end(self.seq)
    return result


@wrap("lmdeploy.pytorch.paging.seq_states.states", "SequenceLifecycle.remove_sequence", ["self", "seq"])
def remove_sequence(original: Callable, self: Any, seq: Any) -> Any:
    from ..scheduler_tier import tier_of

    tier = tier_of(self)
    if tier is None:
        return original(self, seq)
    with tier.removing(seq):
        return original(self, seq)
