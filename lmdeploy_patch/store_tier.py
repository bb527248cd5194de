"""The scheduler side of the third tier: a Mooncake Store behind the host
pool (docs/store_tier.md: deployment, keys, what each failure costs).

GPU cache -> host pool -> store. The store never touches the GPU: every
block goes through a host slot, in the layout the pool holds it (4-bit KV
stays 4-bit), so a store hit is a host hit once fetched.

- Saves. A block saved to a host slot is put to the store once its save is
  seen complete on every local rank (slot_ledger.confirmed); the slot is
  pinned in the host index while the put reads it, and the put thread
  stores only what the store lacks. Nothing waits for a put.
- Matches. A match that ends in the host index continues here
  (`extend`, from scheduler_tier.HostTier.continue_match): the next blocks'
  keys are looked up, host slots are reserved for the leading run the store
  holds, the objects are fetched into them and the slots enter the host
  index as saved; the caller restores them with its host hits, in the same
  plan. A slot is fetched into only while no copy of a rank is planned or
  running on it (slot_ledger.quiet): fetches are not ordered with the ranks'
  copy streams. Lookup and fetch share one budget (lookup_budget_ms); past
  it the rest is a miss, and a fetch still running keeps its slots reserved
  (pending: never matched) until it ends, when they are given back.
- Keys: store_keys.py. Transport, threads, failures: store_link.py.

The store is used only with the ranks in the scheduler's process (one GPU,
or the CPU engine): the fetch writes the ranks' host slots from here.
"""
from __future__ import annotations

import time
from collections import deque
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Optional

import numpy as np

from . import store_keys, store_link
from .histogram import LATENCY_BOUNDS_S, Histogram
from .log import log_once

_NO_KEYS = np.empty(0, dtype=np.uint64)
_NO_SLOTS = np.empty(0, dtype=np.uint32)
# Blocks one match looks up at most: 256 keys answer in about a millisecond.
MAX_LOOKUP_BLOCKS = 256
# Of the host pool, the most that puts may pin at once: a put thread stuck on
# a store that hangs must not take the host tier's slots with it.
MAX_PUT_PINNED_FRACTION = 0.125
# A put call running longer than this takes its link down (as a lookup past its budget does).
PUT_STALL_S = 10.0


class StoreTier:
    def __init__(self, config_id: int, namespace: str, num_slots: int, block_size: int, budget_s: float,
                 bytes_per_block: int, cache_config: Any = None):
        self.config_id = config_id
        self.cache_config = cache_config  # host_cache_store_off set on it: this engine stopped using the store
        self.root = store_keys.root_digest(namespace)
        self.block_size = block_size
        self.budget_s = budget_s
        self.bytes_per_block = bytes_per_block  # over all ranks
        # Each reservation of a slot bumps its generation: a put planned
        # for an older one must not read what the slot holds now.
        self._gen = np.zeros(num_slots, dtype=np.int64)
        self._to_put: dict[int, tuple[bytes, int]] = {}   # slot -> (digest, generation): saves not yet confirmed
        self._putting: dict[int, tuple[np.ndarray, int]] = {}  # token -> (slots pinned, links left)
        self._put_pin_cap = max(1, int(num_slots * MAX_PUT_PINNED_FRACTION))
        self._put_done: deque = deque()                    # (token, stored) from the put threads
        self._late: list[tuple[list[Any], np.ndarray]] = []  # (futures, slots) fetches past their budget
        self._next_token = 0
        self.hit_blocks = 0
        self.hit_tokens = 0
        self.lookups = 0       # matches that asked the store
        self.queried_blocks = 0
        self.puts_unconfirmed = 0  # saves never put: their slot was reused or dropped first
        self.latency = {name: Histogram(LATENCY_BOUNDS_S) for name in ("lookup", "fetch", "put")}

    def links(self) -> list[store_link.StoreLink]:
        if getattr(self.cache_config, "host_cache_store_off", None):
            return []  # this engine stopped using the store (its weights changed: rank_tier.weights_changed)
        return store_link.links(self.config_id)

    # ----- keys

    def digest_after(self, digest: Optional[bytes], ns: int, tokens: np.ndarray) -> Optional[bytes]:
        """The chain digest after the whole blocks of `tokens` (None stays None)."""
        if digest is None:
            return None
        found = store_keys.chain(digest, ns, tokens, self.block_size)
        return found[-1] if found else digest

    # ----- saves

    def created(self, slot: int, digest: Optional[bytes]) -> None:
        """The host index reserved `slot` for a save; with a digest, put it once confirmed."""
        self._gen[slot] += 1
        if digest is not None:
            self._to_put[slot] = (digest, int(self._gen[slot]))
        else:
            self._to_put.pop(slot, None)

    def pump(self, index: Any, ledgers: list) -> None:
        """At each plan: unpins finished puts, gives back the slots of late
        fetches that ended, and hands confirmed saves to the put threads."""
        while self._put_done:
            token, _ = self._put_done.popleft()
            entry = self._putting.get(token)
            if entry is None:
                continue  # a put planned on an index reset() dropped
            slots, left = entry
            if left > 1:
                self._putting[token] = (slots, left - 1)
                continue
            del self._putting[token]
            index.restored(slots, True, False)
        if self._late:
            still = []
            for futures, slots in self._late:
                if all(f.done() for f in futures):
                    for s in slots.tolist():
                        index.saved(int(s), False)
                else:
                    still.append((futures, slots))
            self._late = still
        if self._putting:
            for link in self.links():
                link.put_stalled(PUT_STALL_S)
        if not self._to_put:
            return
        links = self.links()
        if not links or not all(link.up() for link in links):
            return  # kept: a down link comes back within its back-off, and a reused slot is told by its generation
        room = self._put_pin_cap - sum(len(v[0]) for v in self._putting.values())
        if room <= 0:
            return  # the puts running hold their share of the pool: the rest waits
        slots = np.fromiter(self._to_put.keys(), dtype=np.int64, count=len(self._to_put))
        ok = np.ones(len(slots), dtype=bool)
        for ledger in ledgers:
            ok &= ledger.confirmed(slots)
        ready: list[int] = []
        digests: list[bytes] = []
        for slot, good in zip(slots.tolist(), ok.tolist()):
            digest, gen = self._to_put[slot]
            if self._gen[slot] != gen or not index.is_ready(slot):
                del self._to_put[slot]
                self.puts_unconfirmed += 1
            elif good and len(ready) < room:
                del self._to_put[slot]
                ready.append(slot)
                digests.append(digest)
        if not ready:
            return
        pinned = np.array(ready, dtype=np.uint32)
        index.begin_restore(pinned, False)  # a reader's pin: no save or fetch reuses the slot meanwhile
        token = self._next_token
        self._next_token += 1
        self._putting[token] = (pinned, len(links))
        for link in links:
            link.put(digests, ready, lambda stored, t=token: self._put_done.append((t, stored)))

    def drain(self, index: Any, ledgers: list, timeout_s: float = 10.0, saves: bool = False) -> bool:
        """Waits (bounded) until every put and late fetch handed out has
        ended, settling them: an idle engine then holds no slot for the
        store. With `saves`, also until every saved block waiting for its
        confirmation was put (while the links are up). True if all ended in time."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.pump(index, ledgers)
            links = self.links()
            waiting = saves and self._to_put and links and all(link.up() for link in links)
            if not self._putting and not self._late and not waiting:  # (waiting saves hold no pin)
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)

    # ----- matches

    def extend(self, index: Any, ledgers: list, parent_key: int, digest: Optional[bytes], ns: int,
               tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys, slots pinned for a restore) of the blocks of `tokens` the
        store holds from the first on, fetched into host slots that are now
        in the index under `parent_key`; empty when the store has none, is
        down, or did not answer within the budget."""
        bs = self.block_size
        n = min(len(tokens) // bs, MAX_LOOKUP_BLOCKS)
        links = self.links()
        if n == 0 or digest is None or not links or not ledgers:
            return _NO_KEYS, _NO_SLOTS
        if not all(link.up() for link in links):
            for link in links:
                link.add("skipped_down", n)
            return _NO_KEYS, _NO_SLOTS
        digests = store_keys.chain(digest, ns, tokens[:n * bs], bs)
        deadline = time.monotonic() + self.budget_s
        self.lookups += 1
        self.queried_blocks += n
        found = n
        for link, future in [(link, link.lookup(digests)) for link in links]:
            answer = _within(future, deadline)
            if answer is None:
                link.failed("timeout")
                return _NO_KEYS, _NO_SLOTS
            found = min(found, answer)
        slots: list[int] = []
        parent = parent_key
        for i in range(found):
            status, key, slot = index.reserve(parent, ns, tokens[i * bs:(i + 1) * bs])
            if status != "created":
                break  # held or being saved already, or no slot to free: the match stops here
            self._gen[slot] += 1
            self._to_put.pop(slot, None)
            slots.append(int(slot))
            parent = key
        quiet = np.ones(len(slots), dtype=bool)
        for ledger in ledgers:
            quiet &= ledger.quiet(np.array(slots, dtype=np.int64))
        usable = int(np.argmin(quiet)) if not quiet.all() else len(slots)
        for s in slots[usable:]:
            index.saved(s, False)  # a rank's copy may still use it: not this match's to fill
        slots = slots[:usable]
        if not slots:
            return _NO_KEYS, _NO_SLOTS
        reserved = np.array(slots, dtype=np.uint32)
        futures = [link.fetch(digests[:len(slots)], slots) for link in links]
        ok = np.ones(len(slots), dtype=bool)
        for link, future in zip(links, futures):
            answer = _within(future, deadline)
            if answer is None:
                link.failed("timeout")
                self._late.append((futures, reserved))  # given back once every fetch ended (pump)
                return _NO_KEYS, _NO_SLOTS
            ok &= np.array(answer, dtype=bool)
        good = int(np.argmin(ok)) if not ok.all() else len(slots)
        for s in slots[good:]:
            index.saved(s, False)  # after a block that is not there, the chain cannot be matched
        if good == 0:
            return _NO_KEYS, _NO_SLOTS
        for s in slots[:good]:
            index.saved(s, True)
        for ledger in ledgers:
            ledger.filled(reserved[:good])
        keys, pinned = index.match(parent_key, ns, tokens[:good * bs], True)
        self.hit_blocks += len(pinned)
        self.hit_tokens += len(pinned) * bs
        return keys, pinned

    # ----- the rest

    def reset(self) -> None:
        """The engine slept: the host index was replaced; nothing planned on the old one is settled on the new."""
        self._to_put.clear()
        self._putting.clear()
        self._put_done.clear()
        self._late = []  # the old pool's slots: its memory stays alive while a fetch runs (store_link)
        self._gen[:] += 1

    def metrics(self) -> dict:
        links = self.links()
        counts = store_link.retired_counts(self.config_id)
        for link in links:
            for k, v in link.counts.items():
                counts[k] = counts.get(k, 0) + v
            for name, samples in link.samples.items():
                while samples:
                    self.latency[name].observe(samples.popleft())
        return {
            "host_store_lookups": self.lookups, "host_store_queried_blocks": self.queried_blocks,
            "host_store_hit_blocks": self.hit_blocks, "host_store_hit_tokens": self.hit_tokens,
            "host_store_bytes_read": counts.get("bytes_read", 0),
            "host_store_bytes_written": counts.get("bytes_written", 0),
            "host_store_blocks_put": counts.get("put_blocks", 0),
            "host_store_blocks_present": counts.get("put_present", 0),
            "host_store_skipped_down": counts.get("skipped_down", 0),
            "host_store_puts_unconfirmed": self.puts_unconfirmed,
            **{f"host_store_failures_{k}": counts.get(f"failures_{k}", 0) for k in store_link.FAILURE_KINDS},
            "host_store_up": int(bool(links) and all(link.up() for link in links)),
            **{f"host_store_{name}_latency": h.snapshot() for name, h in self.latency.items()},
        }


def _within(future: Any, deadline: float) -> Optional[Any]:
    """The future's result if it comes before `deadline`, else None (it keeps running)."""
    try:
        return future.result(timeout=max(0.0, deadline - time.monotonic()))
    except FutureTimeout:
        return None


def attach(tier: Any, cache_config: Any) -> None:
    """After the HostTier is built: the store behind it, when one is configured."""
    path = getattr(cache_config, "host_cache_store", None)
    namespace = getattr(cache_config, "host_cache_store_namespace", None)
    if not path or tier is None:
        return
    if namespace is None:
        log_once("host_cache_store is set but this engine's pool sizing gave it no key namespace; the store is not "
                 "used")
        return
    from lmdeploy_hostcache.mooncake_store import StoreConfig

    try:
        budget = StoreConfig.from_file(path).lookup_budget_ms / 1e3  # checked when the config was built
    except ValueError as e:
        log_once(f"host_cache_store: {e}; the store is not used")
        return
    tier.use_store(StoreTier(id(cache_config), namespace, tier.index.capacity, tier.block_size, budget,
                             tier.bytes_per_block, cache_config))
