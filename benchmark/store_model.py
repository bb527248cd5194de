"""A model of a Mooncake Store for the CPU replay, where engines have no
ranks and no host memory: which keys the store holds, nothing else.

ModelLink stands in for a rank's lmdeploy_patch.store_link.StoreLink with
the same calls, each answered at once: a lookup finds the keys put before
it, a fetch always brings the object back whole, a put stores what is not
held yet. So the model assumes a put lands before any later turn looks its
blocks up (turns are seconds apart, a put of a block takes milliseconds),
a store that never fails, and, by default, one that never evicts (a
capacity in objects evicts the least recently put or read).
tests/store/test_store_model.py checks that its hits equal a real store's
on a small workload (benchmark/router_replay.py drives both).

attach_model_store puts the scheduler-side store tier (the real one,
lmdeploy_patch/store_tier.py) behind a replay engine's host tier, with a
ledger (lmdeploy_patch/slot_ledger.py) whose copies the replay's forward
marks done as it takes each plan.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Callable, Optional

import numpy as np


def _done(value) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


class ModelStore:
    """The keys a cluster's store holds, shared by every engine's links."""

    def __init__(self, capacity: Optional[int] = None):
        self.keys: "OrderedDict[str, None]" = OrderedDict()
        self.capacity = capacity
        self.evictions = 0

    def has(self, key: str) -> bool:
        if key in self.keys:
            self.keys.move_to_end(key)
            return True
        return False

    def add(self, key: str) -> None:
        self.keys[key] = None
        self.keys.move_to_end(key)
        while self.capacity is not None and len(self.keys) > self.capacity:
            self.keys.popitem(last=False)
            self.evictions += 1


class ModelLink:
    def __init__(self, store: ModelStore, prefix: str, slot_bytes: int):
        from lmdeploy_patch.store_link import new_counts

        self.store, self.prefix, self.slot_bytes = store, prefix, slot_bytes
        self.counts = new_counts()
        self.samples: dict[str, deque] = {"lookup": deque(), "fetch": deque(), "put": deque()}

    def up(self) -> bool:
        return True

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] += n

    def failed(self, kind: str, n: int = 1) -> None:
        self.counts[f"failures_{kind}"] += n

    def key(self, digest: bytes) -> str:
        return self.prefix + digest.hex()

    def lookup(self, digests: list[bytes]) -> Future:
        self.counts["lookups"] += 1
        self.counts["lookup_blocks"] += len(digests)
        n = 0
        while n < len(digests) and self.store.has(self.key(digests[n])):
            n += 1
        self.counts["found_blocks"] += n
        return _done(n)

    def fetch(self, digests: list[bytes], slots: list[int]) -> Future:
        self.counts["fetched_blocks"] += len(slots)
        self.counts["bytes_read"] += len(slots) * self.slot_bytes
        return _done([True] * len(slots))

    def put(self, digests: list[bytes], slots: list[int], done: Callable[[list[bool]], None]) -> None:
        for d in digests:
            key = self.key(d)
            if self.store.has(key):
                self.counts["put_present"] += 1
            else:
                self.store.add(key)
                self.counts["put_blocks"] += 1
                self.counts["bytes_written"] += self.slot_bytes
        done([True] * len(digests))


def attach_model_store(engine, store: ModelStore, namespace: str = "replay") -> None:
    """`engine` (a benchmark.replay.ReplayEngine with a host tier) puts to
    and matches from `store`; its forward marks each plan's copies done."""
    from lmdeploy_patch import slot_ledger, store_keys, store_link
    from lmdeploy_patch.store_tier import StoreTier

    tier = engine.tier
    cc = engine.scheduler.cache_config
    ledger = slot_ledger.SlotLedger(tier.index.capacity, False, lambda slot: 0, lambda slots, blocks: None)
    link = ModelLink(store, store_keys.key_prefix(namespace, 0), engine.kv_block_bytes)
    tier.config_id = id(cc)
    slot_ledger.register(id(cc), ledger)
    store_link.register(id(cc), link)
    engine._store_refs = (ledger, link)  # the registries hold them weakly
    tier.use_store(StoreTier(id(cc), namespace, tier.index.capacity, tier.block_size, 1.0, engine.kv_block_bytes))
    forward = engine.loop.forward

    def forward_and_copy(batch, plan, prefill, host_tokens):
        if plan is not None:  # the ranks' part, done at once
            saves = np.concatenate([plan.pre_slots, plan.post_slots])
            if len(saves):
                ledger.copied(saves)
            if len(plan.restore_slots):
                ledger.restoring(None, plan.restore_slots)
        forward(batch, plan, prefill, host_tokens)

    engine.loop.forward = forward_and_copy
