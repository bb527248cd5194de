"""Exact-byte round trips through offload and restore on LMDeploy-shaped pools."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from kv_layouts import KVPool, KVShape
from lmdeploy_hostcache import MiB, HostCache, HostCacheConfig, slot_stride

LAYOUTS = [(dt, lay) for dt in ("bf16", "int8", "int4") for lay in ("packed", "separate")]


def make_cache(pool: KVPool, slots: int, **kw) -> HostCache:
    slot_bytes = sum(r.bytes for r in pool.regions())
    stride = slot_stride(slot_bytes)
    cfg = HostCacheConfig(capacity_bytes=slots * stride, block_tokens=pool.shape.block_size, **kw)
    return HostCache.from_tensors(cfg, pool.tensors, block_dim=pool.block_dim)


def prompt(rng: np.random.Generator, blocks: int, block_size: int = 64) -> np.ndarray:
    return rng.integers(0, 128_000, size=blocks * block_size, dtype=np.int32)


@pytest.mark.parametrize("dtype,layout", LAYOUTS)
@pytest.mark.parametrize("workers", [0, 2])
def test_offload_then_restore_is_byte_exact(dtype, layout, workers):
    rng = np.random.default_rng(7)
    pool = KVPool(KVShape(dtype=dtype, layers=3), num_blocks=24, layout=layout)
    cache = make_cache(pool, slots=16, cpu_workers=workers, checksum=True)
    tokens = prompt(rng, 6)
    src = [3, 17, 5, 0, 23, 9]
    saved = [pool.block_bytes(b) for b in src]
    res = cache.offload(tokens, src)
    assert res.created == 6 and res.existing == 0 and res.dropped == 0
    assert res.transfer.wait()
    for slot, want in zip(res.slots, saved):  # host memory holds the block, page-first
        assert cache.slot_view(slot).tobytes() == want

    pool.scribble(range(pool.num_blocks))
    m = cache.match(tokens, pin=True)
    assert m.num_blocks == 6 and list(m.slots) == list(res.slots)
    dst = [11, 2, 20, 14, 7, 1]
    t = cache.restore(m, dst)
    assert t.wait(), t.error
    for b, want in zip(dst, saved):
        assert pool.block_bytes(b) == want
    s = cache.stats()
    assert s["bytes_restored"] == s["bytes_offloaded"] == 6 * cache.slot_bytes
    assert s["checksum_failures"] == 0 and s["transfers_in_flight"] == 0
    assert s["slots_used"] == 6
    cache.check_invariants()


def test_restore_leaves_other_blocks_alone():
    rng = np.random.default_rng(1)
    pool = KVPool(KVShape(dtype="int4"), num_blocks=16)
    cache = make_cache(pool, slots=8)
    tokens = prompt(rng, 2)
    assert cache.offload(tokens, [4, 5]).transfer.wait()
    before = {b: pool.block_bytes(b) for b in range(16)}
    assert cache.restore(cache.match(tokens), [9, 10]).wait()
    for b in range(16):
        if b not in (9, 10):
            assert pool.block_bytes(b) == before[b], f"block {b} was touched"
    assert pool.block_bytes(9) == before[4] and pool.block_bytes(10) == before[5]


def test_many_transfers_in_flight():
    rng = np.random.default_rng(3)
    pool = KVPool(KVShape(dtype="bf16", layers=2), num_blocks=160)
    cache = make_cache(pool, slots=200, cpu_workers=2, checksum=True)
    prompts = [prompt(rng, 4) for _ in range(40)]
    expected = {}
    results = []
    for i, p in enumerate(prompts):  # 40 offloads queued without waiting
        blocks = list(range(4 * i, 4 * i + 4))
        expected[i] = [pool.block_bytes(b) for b in blocks]
        results.append(cache.offload(p, blocks))
    assert cache.stats()["transfers_in_flight"] >= 1 or all(r.transfer.done() for r in results)
    for r in results:
        assert r.transfer.wait()
    pool.scribble(range(160))
    restores = []
    order = rng.permutation(40)
    for j, i in enumerate(order):  # 40 restores in flight into a shuffled layout
        m = cache.match(prompts[i], pin=True)
        assert m.num_blocks == 4
        restores.append((i, list(range(4 * j, 4 * j + 4)), cache.restore(m, list(range(4 * j, 4 * j + 4)))))
    cache.wait_all()
    for i, blocks, t in restores:
        assert t.done() and t.ok
        assert [pool.block_bytes(b) for b in blocks] == expected[i]
    s = cache.stats()
    assert s["transfers_in_flight"] == 0 and s["blocks_restored"] == 160 and s["checksum_failures"] == 0
    cache.check_invariants()


def test_restore_waits_for_offload_of_same_block():
    """A restore into a block that an offload is still reading must not race it."""
    rng = np.random.default_rng(5)
    pool = KVPool(KVShape(dtype="bf16", layers=8, heads=8, head_dim=128), num_blocks=8)
    cache = make_cache(pool, slots=8, cpu_workers=2)
    a, b = prompt(rng, 1), prompt(rng, 1)
    assert cache.offload(a, [0]).transfer.wait()
    want_b = pool.block_bytes(1)
    off = cache.offload(b, [1])                        # reads block 1 ...
    t = cache.restore(cache.match(a), [1])             # ... while a restore overwrites it
    assert t.wait() and off.transfer.wait()
    assert cache.slot_view(off.slots[0]).tobytes() == want_b
    assert pool.block_bytes(1) == pool.block_bytes(0)


def test_offload_is_idempotent_and_chains():
    rng = np.random.default_rng(2)
    pool = KVPool(KVShape(dtype="int8"), num_blocks=16)
    cache = make_cache(pool, slots=8)
    tokens = prompt(rng, 4)
    first = cache.offload(tokens[:128], [0, 1])
    assert first.transfer.wait() and first.created == 2
    again = cache.offload(tokens, [0, 1, 2, 3])          # first two already stored
    assert again.transfer.wait()
    assert (again.created, again.existing) == (2, 2)
    assert again.transfer.num_blocks == 2
    assert list(again.keys[:2]) == list(first.keys)
    # a match can start in the middle, from the key of the block before
    m = cache.match(tokens[128:], parent=int(first.keys[-1]))
    assert m.num_blocks == 2 and list(m.keys) == list(again.keys[2:])


def test_namespaces_never_share():
    rng = np.random.default_rng(4)
    pool = KVPool(KVShape(dtype="bf16"), num_blocks=8)
    cache = make_cache(pool, slots=8)
    tokens = prompt(rng, 2)
    assert cache.offload(tokens, [0, 1], namespace=11).transfer.wait()
    assert cache.match(tokens, namespace=12).num_blocks == 0
    assert cache.match(tokens).num_blocks == 0
    assert cache.match(tokens, namespace=11).num_blocks == 2
    res = cache.offload(tokens, [2, 3], namespace=12)
    assert res.created == 2 and set(res.slots).isdisjoint(cache.match(tokens, namespace=11).slots)


def test_pool_pressure_evicts_lru_and_keeps_pinned():
    rng = np.random.default_rng(6)
    pool = KVPool(KVShape(dtype="int4"), num_blocks=32)
    cache = make_cache(pool, slots=6)
    old, keep, new = prompt(rng, 2), prompt(rng, 2), prompt(rng, 4)
    assert cache.offload(old, [0, 1]).transfer.wait()
    assert cache.offload(keep, [2, 3]).transfer.wait()
    held = cache.match(keep, pin=True)           # pinned: must survive
    assert cache.match(old).num_blocks == 2      # touch old after keep: keep is older but pinned
    res = cache.offload(new, [4, 5, 6, 7])       # needs two slots more than are free
    assert res.transfer.wait() and res.created == 4 and res.dropped == 0
    assert cache.match(keep).num_blocks == 2
    assert cache.match(old).num_blocks == 0       # old's leaf went first, then old's root
    assert cache.stats()["evictions"] == 2
    held.release()
    cache.check_invariants()


def test_full_pool_of_pinned_blocks_drops_offload():
    rng = np.random.default_rng(8)
    pool = KVPool(KVShape(dtype="int4"), num_blocks=16)
    cache = make_cache(pool, slots=2)
    a = prompt(rng, 2)
    assert cache.offload(a, [0, 1]).transfer.wait()
    m = cache.match(a, pin=True)
    res = cache.offload(prompt(rng, 1), [2])
    assert res.dropped == 1 and res.created == 0 and res.slots[0] == -1
    assert res.transfer.done() and res.transfer.ok  # nothing to copy
    m.release()
    res = cache.offload(prompt(rng, 1), [2])
    assert res.created == 1 and res.transfer.wait()
    cache.check_invariants()


def test_failed_offload_costs_a_recompute_not_a_slot():
    rng = np.random.default_rng(9)
    pool = KVPool(KVShape(dtype="bf16"), num_blocks=16)
    cache = make_cache(pool, slots=8)
    tokens = prompt(rng, 3)
    cache.inject_failures(1)
    res = cache.offload(tokens, [0, 1, 2])
    assert res.transfer.wait() is False and "injected" in res.transfer.error
    assert cache.match(tokens).num_blocks == 0
    s = cache.stats()
    assert s["slots_used"] == 0 and s["transfers_failed"] == 1 and s["bytes_offloaded"] == 0
    cache.check_invariants()
    res = cache.offload(tokens, [0, 1, 2])           # a retry stores them
    assert res.transfer.wait() and cache.match(tokens).num_blocks == 3


def test_failed_restore_unpins_and_keeps_data():
    rng = np.random.default_rng(10)
    pool = KVPool(KVShape(dtype="bf16"), num_blocks=16)
    cache = make_cache(pool, slots=8)
    tokens = prompt(rng, 2)
    assert cache.offload(tokens, [0, 1]).transfer.wait()
    cache.inject_failures(1)
    m = cache.match(tokens, pin=True)
    t = cache.restore(m, [5, 6])
    assert t.wait() is False
    assert cache.stats()["slots_used"] == 2 and cache.match(tokens).num_blocks == 2
    cache.check_invariants()
    assert cache.restore(cache.match(tokens, pin=True), [5, 6]).wait()
    assert pool.block_bytes(5) == pool.block_bytes(0)
    # every pin was dropped: the blocks can be evicted again
    for _ in range(3):
        assert cache.offload(prompt(rng, 3), [8, 9, 10]).transfer.wait()
    assert cache.match(tokens).num_blocks == 0


def test_checksum_catches_corrupt_host_memory():
    rng = np.random.default_rng(11)
    pool = KVPool(KVShape(dtype="int4"), num_blocks=8)
    cache = make_cache(pool, slots=4, checksum=True)
    tokens = prompt(rng, 2)
    res = cache.offload(tokens, [0, 1])
    assert res.transfer.wait()
    cache.slot_view(res.slots[1])[100] ^= 0xFF      # a bit flip in host RAM
    t = cache.restore(cache.match(tokens, pin=True), [4, 5])
    assert t.wait() is False and "checksum mismatch" in t.error
    assert cache.stats()["checksum_failures"] == 1
    # the corrupt block is gone; the good one is still served
    assert cache.match(tokens).num_blocks == 1
    cache.check_invariants()


def test_closing_the_cache_lands_every_copy():
    rng = np.random.default_rng(12)
    pool = KVPool(KVShape(dtype="bf16"), num_blocks=64)
    cache = make_cache(pool, slots=64, cpu_workers=2)
    records = [cache.offload(prompt(rng, 2), [2 * i, 2 * i + 1]).transfer._record for i in range(30)]
    del cache  # in-flight copies must land before the pool is unmapped
    gc.collect()
    assert all(r.finished and r.ok for r in records)
