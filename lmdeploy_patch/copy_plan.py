"""The message from the scheduler side to every rank: which copies between
host slots and physical GPU blocks travel with one forward.

The scheduler side (scheduler_tier.py) builds one HostCopyPlan per forward;
it rides to the model agent inside the forward's cache inputs
(HostCacheInputs), and each rank (rank_tier.py) executes it on its own
store. The two sides share nothing else.

  pre     : write-back saves of blocks the GPU trie evicted in this pass,
            then restores of host hits into the blocks just allocated for
            them; the forward waits for both before the model runs;
  post    : write-through saves of the blocks this forward computes, queued
            after the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
from lmdeploy.pytorch.engine.cache_inputs import CacheCheckpointInputs


@dataclass
class HostCopyPlan:
    """Copies between host slots and physical GPU blocks for one forward."""

    pre_slots: np.ndarray
    pre_blocks: np.ndarray
    restore_slots: np.ndarray
    restore_blocks: np.ndarray
    post_slots: np.ndarray
    post_blocks: np.ndarray
    # Whether the model must wait for saves queued by earlier forwards. A
    # saved block is trie-owned, and only an eviction frees a trie-owned
    # block for reuse: without one since the last plan, no block an earlier
    # save still reads can be rewritten by this forward. (This plan's own
    # pre saves and restores are always waited for.)
    wait_saves: bool = True
    # Whether restores must start after the forwards already queued. A
    # restore writes blocks just allocated; one of them can still be in use
    # by the forward in flight only if it belonged to that forward's batch
    # (a sequence that ended or was preempted while its last step runs), or
    # if a pre save of this plan reads it (a block freed by an eviction).
    # Otherwise the restore runs on the restore stream while that forward computes.
    restore_after_forward: bool = True
    # time.monotonic() when the plan was taken (the system-wide clock, so a
    # rank in another process on this machine can read it): restore latency.
    created: float = 0.0

    @staticmethod
    def build(pre: list[tuple[int, int]], restore: list[tuple[int, int]], post: list[tuple[int, int]],
              wait_saves: bool = True, restore_after_forward: bool = True) -> "HostCopyPlan":
        def cols(pairs):
            a = np.array(pairs, dtype=np.int64).reshape(-1, 2)
            return a[:, 0].astype(np.uint32), a[:, 1].astype(np.int32)

        return HostCopyPlan(*cols(pre), *cols(restore), *cols(post), wait_saves=wait_saves,
                            restore_after_forward=restore_after_forward, created=time.monotonic())


@dataclass(frozen=True)
class HostCacheInputs(CacheCheckpointInputs):
    """LMDeploy's per-forward cache plans plus the host tier's copy plan.

    LMDeploy rebuilds CacheCheckpointInputs in to_device from its four named
    fields, which would drop ours: to_device is overridden to keep it."""

    host_plan: Optional[HostCopyPlan] = None

    @classmethod
    def wrap(cls, base: Optional[CacheCheckpointInputs], plan: HostCopyPlan) -> "HostCacheInputs":
        values = {f.name: getattr(base, f.name) for f in fields(CacheCheckpointInputs)} if base is not None else {}
        return cls(**values, host_plan=plan)

    def to_device(self, device: str, non_blocking: bool = False):
        moved = CacheCheckpointInputs.to_device(self, device, non_blocking=non_blocking)
        return HostCacheInputs.wrap(moved, self.host_plan)
