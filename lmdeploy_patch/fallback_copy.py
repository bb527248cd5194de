"""A second copy path between LMDeploy's KV pools and a rank's host slots.

torch copies, one block and one region at a time, each finished before it
returns. A rank takes it when its store's copy engine refused a copy or
reported one failed (rank_tier.WorkerTier): slower, but it shares no code
with the engine that failed, so one broken path costs a copy, not a
recompute. A slot's bytes are the block's regions one after another, in
the order of rank_tier.pool_regions (the layout the core's engines use).
"""
from __future__ import annotations

from typing import Any

import numpy as np


class FallbackCopier:
    def __init__(self, allocation: Any, blocks_per_logical: int, store: Any):
        import torch

        self._store = store
        self._regions: list[Any] = []  # per region: uint8 [logical blocks, bytes of one block]
        for pool in allocation.pools:
            t = pool.tensor  # [layers, kernel blocks, row]; rows contiguous (pool_regions checked it)
            for layer in range(t.shape[0]):
                rows = t[layer].view(torch.uint8)
                self._regions.append(rows.reshape(t.shape[1] // blocks_per_logical, -1))
        sizes = [r.shape[1] for r in self._regions]
        if sum(sizes) != store.slot_bytes:
            raise ValueError(f"the pools' {sum(sizes)} bytes per block differ from the store's slots of "
                             f"{store.slot_bytes} bytes")
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()
        self.cuda = self._regions[0].is_cuda

    def _slot(self, slot: int) -> Any:
        import torch

        return torch.from_numpy(np.frombuffer(self._store.slot_view(int(slot)), dtype=np.uint8))

    def _pairs(self, slots: Any, blocks: Any) -> list[tuple[int, int]]:
        return list(zip(np.asarray(slots).reshape(-1).tolist(), np.asarray(blocks).reshape(-1).tolist()))

    def save(self, slots: Any, blocks: Any) -> None:
        """blocks[i] -> slots[i], finished on return."""
        for slot, block in self._pairs(slots, blocks):
            host = self._slot(slot)
            for i, region in enumerate(self._regions):
                host[self._offsets[i]:self._offsets[i + 1]].copy_(region[block])

    def restore(self, slots: Any, blocks: Any) -> None:
        """slots[i] -> blocks[i], finished on return."""
        for slot, block in self._pairs(slots, blocks):
            host = self._slot(slot)
            for i, region in enumerate(self._regions):
                region[block].copy_(host[self._offsets[i]:self._offsets[i + 1]])
        if self.cuda:
            import torch

            torch.cuda.current_stream().synchronize()

    def scribble(self, block: int) -> None:
        """Overwrites a device block (test-only faults: faults.py)."""
        for region in self._regions:
            region[int(block)].fill_(0xA5)
        if self.cuda:  # before any copy stream reads the block back
            import torch

            torch.cuda.synchronize()

