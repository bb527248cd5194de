"""A random chain of saves and restores over shared slots and blocks, all
queued before any is waited for, checked against a model of what each slot
and block must hold afterwards. It passes only if copies take effect in
submission order per slot and per device block, whichever streams (CUDA:
restores and saves run on different streams) or workers (CPU) run them."""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np


def run_chain(store, read_block: Callable[[int], bytes], num_blocks: int, seed: int, steps: int = 120,
              most: int = 6, after: Optional[Callable[[str], Any]] = None) -> int:
    """Returns the number of copies checked. `after(direction)` gives each
    copy's after_stream: on a GPU, streams kept busy for random times make
    copies start late, so one that should wait for an earlier copy on the
    other copy stream would otherwise overtake it."""
    rng = np.random.default_rng(seed)
    slots = store.num_slots
    block_val = [read_block(b) for b in range(num_blocks)]
    assert len(set(block_val)) == num_blocks, "the pool's blocks must start distinct"
    slot_val: list[Optional[bytes]] = [None] * slots
    transfers = []
    for _ in range(steps):
        k = int(rng.integers(1, most + 1))
        blocks = rng.choice(num_blocks, size=k, replace=False)
        known = [s for s in range(slots) if slot_val[s] is not None]
        if known and rng.random() < 0.5:
            chosen = rng.choice(known, size=min(k, len(known)), replace=False)
            blocks = blocks[:len(chosen)]
            transfers.append(store.restore(chosen, blocks, **_after(after, "restore")))
            for s, b in zip(chosen, blocks):
                block_val[b] = slot_val[s]
        else:
            chosen = rng.choice(slots, size=k, replace=False)
            transfers.append(store.offload(chosen, blocks, **_after(after, "offload")))
            for s, b in zip(chosen, blocks):
                slot_val[s] = block_val[b]
    for t in transfers:
        assert t.wait(), t.error
    for s, want in enumerate(slot_val):
        if want is not None:
            assert store.slot_view(s).tobytes() == want, f"slot {s} holds the wrong bytes"
    for b, want in enumerate(block_val):
        assert read_block(b) == want, f"device block {b} holds the wrong bytes"
    return sum(t.num_blocks for t in transfers)


def _after(after: Optional[Callable[[str], Any]], direction: str) -> dict:
    return {} if after is None else {"after_stream": after(direction)}
