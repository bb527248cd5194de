"""SlotStore: copies addressed by slot id, without an index."""
from __future__ import annotations

import pytest

from kv_layouts import KVPool, KVShape
from lmdeploy_hostcache import HostCacheConfig, SlotStore, slot_stride
from slot_chain import run_chain


@pytest.mark.parametrize("dtype", ["bf16", "int4"])
def test_slot_round_trip(dtype):
    pool = KVPool(KVShape(dtype=dtype), num_blocks=16)
    slot = sum(r.bytes for r in pool.regions())
    store = SlotStore.from_tensors(HostCacheConfig(capacity_bytes=8 * slot_stride(slot)), pool.tensors,
                                   pool.block_dim)
    assert store.num_slots == 8 and store.slot_bytes == slot
    saved = [pool.block_bytes(b) for b in (3, 4, 5)]
    t = store.offload([7, 0, 2], [3, 4, 5])
    # queued without waiting: a restore of the same slots into other blocks,
    # then an overwrite of a slot while the restore may still read it
    r = store.restore([7, 0, 2], [10, 11, 12])
    assert t.wait() and r.wait()
    assert [pool.block_bytes(b) for b in (10, 11, 12)] == saved
    assert [store.slot_view(s).tobytes() for s in (7, 0, 2)] == saved
    assert store.stats()["slots_total"] == 8


@pytest.mark.parametrize("seed", range(4))
def test_copies_chained_through_shared_slots_and_blocks_keep_submission_order(seed):
    """Saves and restores over the same few slots and blocks, queued without
    waiting, on two CPU workers that take tasks in any order."""
    # 1 MiB blocks: transfers big enough that the workers run several at once
    pool = KVPool(KVShape(heads=8, head_dim=128), num_blocks=12, seed=seed)
    slot = sum(r.bytes for r in pool.regions())
    store = SlotStore.from_tensors(HostCacheConfig(capacity_bytes=10 * slot_stride(slot), cpu_workers=2),
                                   pool.tensors, pool.block_dim)
    assert run_chain(store, pool.block_bytes, 12, seed) > 120


def test_slot_store_bad_input():
    pool = KVPool(KVShape(dtype="int4"), num_blocks=4)
    store = SlotStore.from_tensors(HostCacheConfig(capacity_bytes=1 << 20), pool.tensors, pool.block_dim)
    with pytest.raises(ValueError, match="slot 99 is outside the pool"):
        store.offload([99], [0])
    with pytest.raises(ValueError, match="device block 4 is outside"):
        store.restore([0], [4])
    with pytest.raises(ValueError, match="2 slots but 1 device blocks"):
        store.offload([0, 1], [0])


def test_a_setting_the_store_cannot_keep_is_refused():
    pool = KVPool(KVShape(dtype="bf16"), num_blocks=4)
    with pytest.raises(ValueError, match="checksum=True needs the index: use HostCache"):
        SlotStore.from_tensors(HostCacheConfig(capacity_bytes=1 << 24, checksum=True), pool.tensors, pool.block_dim)


def test_memory_ranges_cover_every_slot_and_stay_put():
    """What a store registers (lmdeploy_hostcache.MooncakeStore): every slot
    lies inside one range, and no slot moves once the ranges were taken."""
    import torch

    from lmdeploy_hostcache import HostCacheConfig, SlotStore

    pool = torch.zeros(2, 64, 256, dtype=torch.uint8)
    store = SlotStore.from_tensors(HostCacheConfig(capacity_bytes=40 * 512, reserve_bytes=0, pin_chunk_bytes=4096),
                                   [pool], block_dim=1)
    ranges = store.memory_ranges()
    addrs = [store.slot_address(s) for s in range(store.num_slots)]
    for a in addrs:
        assert sum(p <= a and a + store.slot_bytes <= p + n for p, n in ranges) == 1, (a, ranges)
    assert store.offload(list(range(8)), list(range(8))).wait()
    assert [store.slot_address(s) for s in range(store.num_slots)] == addrs and store.memory_ranges() == ranges
