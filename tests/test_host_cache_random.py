"""HostCache under long random sequences of offloads, matches, restores,
releases and injected failures, with transfers left in flight across steps.

Properties checked at every step: a restored block holds exactly the bytes
offloaded under its key; a match never exceeds what was offloaded; the index
and pin invariants hold; nothing stays pinned or in flight at the end."""
from __future__ import annotations

import numpy as np
import pytest

from kv_layouts import KVPool, KVShape
from lmdeploy_hostcache import HostCache, HostCacheConfig, slot_stride


@pytest.mark.parametrize("seed", range(4))
def test_random_use_keeps_bytes_and_pins_right(seed):
    rng = np.random.default_rng(seed)
    pool = KVPool(KVShape(dtype="int4", layers=2, heads=1, head_dim=32), num_blocks=48, seed=seed)
    slot = sum(r.bytes for r in pool.regions())
    cache = HostCache.from_tensors(
        HostCacheConfig(capacity_bytes=int(rng.integers(6, 20)) * slot_stride(slot), cpu_workers=2,
                        checksum=True), pool.tensors, pool.block_dim)
    # conversations: a prompt grows turn by turn, so prefixes are shared
    convs = [rng.integers(0, 50, size=64 * 6, dtype=np.int32) for _ in range(5)]
    content: dict[int, bytes] = {}   # key -> bytes of its latest stored copy
    pending: list = []               # (transfer, device blocks it uses, [(dst block, expected bytes)])
    held: list = []                  # pinned matches not yet restored
    busy: set[int] = set()           # device blocks a transfer in flight reads or writes
    restored_blocks = 0

    def settle(item) -> None:
        nonlocal restored_blocks
        t, used, dests = item
        ok = t.wait()
        busy.difference_update(used)
        for b, want in dests:
            if ok:
                assert pool.block_bytes(b) == want
                restored_blocks += 1

    for step in range(400):
        op = rng.choice(["offload", "restore", "match_hold", "release", "settle", "fail"], p=[.3, .3, .1, .1, .15, .05])
        conv = convs[rng.integers(len(convs))]
        nblocks = int(rng.integers(1, 7))
        toks = conv[:64 * nblocks]
        free = [b for b in range(48) if b not in busy]
        if op == "offload" and len(free) >= nblocks:
            src = [int(b) for b in rng.choice(free, size=nblocks, replace=False)]
            pool.scribble(src, seed=int(rng.integers(1 << 30)))
            keys = cache.block_keys(toks)
            snap = [pool.block_bytes(b) for b in src]
            res = cache.offload(toks, src)
            copied = set(int(x) for x in res.transfer._record.slots)
            for k, s_, b in zip(keys, res.slots, snap):
                if s_ >= 0 and int(s_) in copied:  # created by this offload
                    content[int(k)] = b
            busy.update(src)
            pending.append((res.transfer, src, []))
        elif op in ("restore", "match_hold"):
            m = cache.match(toks, pin=True)
            assert m.num_blocks <= nblocks
            for k in m.keys:
                assert int(k) in content, "matched a block never offloaded"
            if op == "match_hold":
                held.append(m)
                continue
            if m.num_blocks == 0 or len(free) < m.num_blocks:
                m.release()
                continue
            dst = [int(b) for b in rng.choice(free, size=m.num_blocks, replace=False)]
            busy.update(dst)
            # what the matched slots hold now: a key may be evicted and stored anew
            # (other bytes) after this restore lands but before it is checked
            want = [content[int(k)] for k in m.keys]
            pending.append((cache.restore(m, dst), dst, list(zip(dst, want))))
        elif op == "release" and held:
            held.pop(int(rng.integers(len(held)))).release()
        elif op == "fail":
            cache.inject_failures(1)
        elif op == "settle" and pending:
            settle(pending.pop(int(rng.integers(len(pending)))))
        cache.check_invariants()
        s = cache.stats()
        assert s["slots_used"] <= s["slots_total"] and s["checksum_failures"] == 0
    for item in pending:
        settle(item)
    for m in held:
        m.release()
    s = cache.stats()
    assert s["transfers_in_flight"] == 0
    assert restored_blocks > 0 and s["evictions"] > 0
    cache.check_invariants()
    # every pin is gone: the whole pool can be evicted by new offloads
    cache.inject_failures(0)
    for i in range(s["slots_total"]):
        assert cache.offload(np.full(64, 1000 + i, np.int32), [i % 48]).transfer.wait()
    for c in convs:
        assert cache.match(c).num_blocks == 0
