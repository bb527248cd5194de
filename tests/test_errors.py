"""Every bad input gets a clear error that says what to change."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from kv_layouts import KVPool, KVShape
from lmdeploy_hostcache import (GiB, MiB, HostCache, HostCacheConfig, Region, available_ram_bytes, build_info,
                                regions_from_tensor)


@pytest.fixture
def pool():
    return KVPool(KVShape(dtype="int4"), num_blocks=8)


def cache_for(pool, **kw):
    return HostCache.from_tensors(HostCacheConfig(capacity_bytes=4 * MiB, **kw), pool.tensors, pool.block_dim)


@pytest.mark.parametrize("kwargs,match", [
    (dict(capacity_bytes=-1), "capacity_bytes must be >= 1"),
    (dict(capacity_bytes=1.5), "capacity_bytes must be an int"),
    (dict(capacity_bytes=True), "capacity_bytes must be an int"),
    (dict(capacity_bytes=MiB, block_tokens=0), "block_tokens must be >= 1"),
    (dict(capacity_bytes=MiB, pin="always"), "pin must be one of"),
    (dict(capacity_bytes=MiB, copy_path="dma"), "copy_path must be one of"),
    (dict(capacity_bytes=MiB, device="gpu"), "device must be 'cpu', 'cuda' or 'cuda:N'"),
    (dict(capacity_bytes=MiB, cpu_workers=-1), "cpu_workers must be >= 0"),
    (dict(capacity_bytes=MiB, checksum="yes"), "checksum must be a bool"),
])
def test_bad_config(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        HostCacheConfig(**kwargs)


@pytest.mark.parametrize("gib", [0, -1, float("nan"), float("inf"), "4"])
def test_bad_size_in_gib(gib):
    with pytest.raises(ValueError, match="positive finite number of GiB"):
        HostCacheConfig.from_gib(gib)


def test_pool_larger_than_ram_is_refused_with_both_numbers(pool):
    too_big = available_ram_bytes() + 64 * GiB
    cfg = HostCacheConfig(capacity_bytes=too_big, capacity_setting="host_cache_size")
    with pytest.raises(ValueError) as e:
        HostCache.from_tensors(cfg, pool.tensors, pool.block_dim)
    msg = str(e.value)
    assert "does not fit" in msg and "available" in msg and "reserve" in msg and "host_cache_size" in msg
    assert msg.count("GiB") >= 3


def test_reserve_counts_against_the_pool(pool):
    cfg = HostCacheConfig(capacity_bytes=64 * MiB, reserve_bytes=available_ram_bytes())
    with pytest.raises(ValueError, match="in reserve"):
        HostCache.from_tensors(cfg, pool.tensors, pool.block_dim)


def test_pool_smaller_than_one_block(pool):
    with pytest.raises(ValueError, match="holds no block"):
        HostCache.from_tensors(HostCacheConfig(capacity_bytes=1024), pool.tensors, pool.block_dim)


def test_bad_regions():
    buf = torch.zeros(1 << 16, dtype=torch.uint8)
    base = buf.data_ptr()
    cfg = HostCacheConfig(capacity_bytes=MiB)
    with pytest.raises(ValueError, match="no cache regions"):
        HostCache(cfg, [], 4)
    with pytest.raises(ValueError, match="zero bytes per block"):
        HostCache(cfg, [Region(base, 256, 0)], 4)
    with pytest.raises(ValueError, match="stride 128 smaller than its bytes per block 256"):
        HostCache(cfg, [Region(base, 128, 256)], 4)
    with pytest.raises(ValueError, match="regions 0 and 1 overlap"):
        HostCache(cfg, [Region(base, 1024, 512), Region(base + 256, 1024, 512)], 4)
    with pytest.raises(ValueError, match="null base pointer"):
        HostCache(cfg, [Region(0, 256, 256)], 4)
    with pytest.raises(ValueError, match="num_device_blocks must be a positive int"):
        HostCache(cfg, [Region(base, 256, 256)], 0)
    with pytest.raises(ValueError, match="must be \\(base, stride, bytes\\)"):
        HostCache(cfg, [(base, 256)], 4)
    # interleaved regions sharing one stride (a block-first pool) are fine
    c = HostCache(cfg, [Region(base, 1024, 512), Region(base + 512, 1024, 512)], 4)
    assert c.slot_bytes == 1024


def test_bad_tensors():
    t = torch.zeros(4, 8, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="block_dim 3 is outside"):
        regions_from_tensor(t, 3)
    with pytest.raises(ValueError, match="not contiguous"):
        regions_from_tensor(t.transpose(1, 2), 0)
    with pytest.raises(ValueError, match="disagree on the number of blocks"):
        HostCache.from_tensors(HostCacheConfig(capacity_bytes=MiB), [t, torch.zeros(5, 8)], 0)
    with pytest.raises(ValueError, match="config.device is 'cuda' but the tensors live on 'cpu'"):
        HostCache.from_tensors(HostCacheConfig(capacity_bytes=MiB, device="cuda"), [t], 0)


@pytest.mark.skipif(build_info()["gpu_usable"], reason="checks the no-GPU message")
def test_cuda_regions_without_a_gpu():
    buf = torch.zeros(4096, dtype=torch.uint8)
    with pytest.raises(ValueError, match="no GPU is usable"):
        HostCache(HostCacheConfig(capacity_bytes=MiB, device="cuda"), [Region(buf.data_ptr(), 1024, 1024)], 4)


def test_bad_offload_arguments(pool):
    cache = cache_for(pool)
    toks = np.arange(128, dtype=np.int32)
    with pytest.raises(ValueError, match="device block 8 is outside the registered pool of 8 blocks"):
        cache.offload(toks, [0, 8])
    with pytest.raises(ValueError, match="device block -1 is outside"):
        cache.offload(toks, [-1])
    with pytest.raises(ValueError, match="3 device blocks need 192 tokens"):
        cache.offload(toks, [0, 1, 2])
    with pytest.raises(ValueError, match="shape \\(2, 64\\)"):
        cache.offload_blocks([0, 0], [0, 0], np.zeros((2, 32), np.int32), [0, 1])
    with pytest.raises(ValueError, match="2 device blocks but 1 parents"):
        cache.offload_blocks([0], [0, 0], np.zeros((2, 64), np.int32), [0, 1])
    assert cache.stats()["slots_used"] == 0  # nothing half-done


def test_bad_tokens(pool):
    cache = cache_for(pool)
    with pytest.raises(ValueError, match="must fit in int32"):
        cache.match(np.array([1, 2**40], dtype=np.int64))
    with pytest.raises(TypeError, match="must be integers"):
        cache.match(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="1-D array"):
        cache.match(np.zeros((2, 64), np.int32))


def test_bad_restore_arguments(pool):
    cache = cache_for(pool)
    toks = np.arange(128, dtype=np.int32)
    res = cache.offload(toks, [0, 1])
    assert res.transfer.wait()
    with pytest.raises(ValueError, match="holds no ready block"):
        cache.restore([cache.num_slots - 1], [2])
    with pytest.raises(ValueError, match="holds no ready block"):
        cache.restore([10**6], [2])
    with pytest.raises(ValueError, match="appears twice among the restore destinations"):
        cache.restore(res.slots, [3, 3])
    with pytest.raises(ValueError, match="2 slots but 1 device blocks"):
        cache.restore(res.slots, [3])
    with pytest.raises(ValueError, match="outside the registered pool"):
        cache.restore(res.slots, [3, 99])
    with pytest.raises(ValueError, match="release of slot .* that no match pinned"):
        cache._core.release(np.array(res.slots, np.uint32))
    cache.check_invariants()
    assert cache.stats()["transfers_in_flight"] == 0


def test_transfer_ok_before_done_is_an_error(pool):
    cache = cache_for(pool, cpu_workers=1)
    t = cache.offload(np.arange(64, dtype=np.int32), [0]).transfer
    if not t._record.finished:
        with pytest.raises(RuntimeError, match="still running"):
            _ = t.ok
    assert t.wait() and t.ok
