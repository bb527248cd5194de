"""Round trips through pinned host memory on a real GPU, both copy paths.

Skipped unless this build has CUDA and a GPU is usable (conftest.py; with
HOSTCACHE_EXPECT_GPU=1 a missing GPU fails instead). Tensors made on the
default stream are used on side streams only after those streams waited for
it. Pools are small and keep no RAM reserve (reserve_bytes=0): the GPU
machine's MemAvailable may start small."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lmdeploy_hostcache import HostCache, HostCacheConfig, SlotStore, slot_stride
from slot_chain import run_chain

LAYERS, BLOCK = 4, 64
# bytes of one layer's 64-token block for 8 KV heads of dim 128 (LMDeploy packed pool)
LAYER_BLOCK = {"bf16": 2 * 64 * 8 * 128 * 2, "int8": 2 * 64 * 8 * 128 + 2 * 64 * 8 * 2 * 2,
               "int4": 2 * 64 * 8 * 64 + 2 * 64 * 8 * 2 * 2}
PATHS = ["kernel", "memcpy"]


def gpu_pool(dtype: str, blocks: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.randint(0, 256, (LAYERS, blocks, LAYER_BLOCK[dtype]), dtype=torch.uint8, device="cuda", generator=g)


def block_bytes(pool: torch.Tensor, b: int) -> bytes:
    return pool[:, b, :].contiguous().cpu().numpy().tobytes()


def make_cache(pool: torch.Tensor, slots: int, **kw) -> HostCache:
    slot = pool.shape[0] * pool.shape[2]
    cfg = HostCacheConfig(capacity_bytes=slots * slot_stride(slot), checksum=True, reserve_bytes=0, **kw)
    return HostCache.from_tensors(cfg, [pool], block_dim=1)


def tokens(rng: np.random.Generator, blocks: int) -> np.ndarray:
    return rng.integers(0, 128_000, size=blocks * BLOCK, dtype=np.int32)


@pytest.mark.parametrize("dtype", list(LAYER_BLOCK))
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("pin", ["lazy", "eager"])
def test_round_trip_is_byte_exact(dtype, path, pin):
    rng = np.random.default_rng(0)
    pool = gpu_pool(dtype, 96)
    cache = make_cache(pool, 80, copy_path=path, pin=pin)
    toks = tokens(rng, 64)
    src = rng.permutation(96)[:64]
    saved = [block_bytes(pool, b) for b in src]
    res = cache.offload(toks, src)
    assert res.created == 64 and res.transfer.wait(), res.transfer.error
    for slot, want in zip(res.slots, saved):
        assert cache.slot_view(slot).tobytes() == want
    pool.random_(0, 256)
    dst = rng.permutation(96)[:64]
    t = cache.restore(cache.match(toks, pin=True), dst)
    assert t.wait(), t.error
    torch.cuda.synchronize()
    for b, want in zip(dst, saved):
        assert block_bytes(pool, b) == want
    s = cache.stats()
    assert s["pinned"] and s["pinned_bytes"] > 0 and s["checksum_failures"] == 0
    assert s["copy_engine"].startswith("cuda-" + ("kernel" if path == "kernel" else "memcpy"))
    cache.check_invariants()


@pytest.mark.parametrize("path", PATHS)
def test_many_regions_int4_with_scales(path):
    """Separate K/V/scale-zero tensors per layer: 16 regions of mixed sizes."""
    rng = np.random.default_rng(1)
    n = 40
    tensors = []
    for _ in range(LAYERS):
        tensors += [torch.randint(0, 256, (n, BLOCK, 8, 64), dtype=torch.uint8, device="cuda") for _ in range(2)]
        tensors += [torch.randn(n, BLOCK, 8, 2, dtype=torch.bfloat16, device="cuda") for _ in range(2)]
    cfg = HostCacheConfig(capacity_bytes=64 << 20, copy_path=path, checksum=True, reserve_bytes=0)
    cache = HostCache.from_tensors(cfg, tensors, block_dim=0)

    def raw(b: int) -> bytes:
        return b"".join(t[b].contiguous().view(-1).view(torch.uint8).cpu().numpy().tobytes() for t in tensors)

    toks = tokens(rng, 8)
    saved = [raw(b) for b in range(8)]
    assert cache.offload(toks, range(8)).transfer.wait()
    t = cache.restore(cache.match(toks), range(20, 28))
    assert t.wait(), t.error
    assert [raw(b) for b in range(20, 28)] == saved


@pytest.mark.parametrize("path", PATHS)
def test_restore_while_another_stream_writes_elsewhere(path):
    rng = np.random.default_rng(2)
    pool = gpu_pool("int4", 128)
    cache = make_cache(pool, 64, copy_path=path)
    toks = tokens(rng, 32)
    saved = [block_bytes(pool, b) for b in range(32)]
    assert cache.offload(toks, range(32)).transfer.wait()
    side = torch.cuda.Stream()
    others = torch.arange(96, 128, device="cuda")
    side.wait_stream(torch.cuda.current_stream())  # `pool` and `others` were made on the default stream
    with torch.cuda.stream(side):
        for v in range(50):  # a busy writer on blocks the restore does not touch
            pool.index_fill_(1, others, v)
    t = cache.restore(cache.match(toks), range(32, 64))
    assert t.wait(), t.error
    side.synchronize()
    for i, b in enumerate(range(32, 64)):
        assert block_bytes(pool, b) == saved[i]
    assert bool((pool[:, 96:128, :] == 49).all())


@pytest.mark.parametrize("path", PATHS)
def test_copies_order_after_the_given_stream(path):
    """An offload waits for the forward that fills its blocks (after_stream);
    a consumer stream waits for a restore (wait_on_stream)."""
    rng = np.random.default_rng(3)
    pool = gpu_pool("bf16", 16)
    cache = make_cache(pool, 16, copy_path=path)
    fwd = torch.cuda.Stream()
    fwd.wait_stream(torch.cuda.current_stream())  # the pool was made on the default stream
    with torch.cuda.stream(fwd):
        torch.cuda._sleep(50_000_000)          # a long forward ...
        pool[:, 0:4, :].fill_(7)               # ... that writes the blocks last
    toks = tokens(rng, 4)
    res = cache.offload(toks, range(4), after_stream=fwd)
    assert res.transfer.wait(), res.transfer.error
    for slot in res.slots:
        assert (cache.slot_view(slot) == 7).all()
    consumer = torch.cuda.Stream()
    t = cache.restore(cache.match(toks), range(8, 12))
    t.wait_on_stream(consumer)
    with torch.cuda.stream(consumer):
        seen = pool[:, 8:12, :].clone()
    consumer.synchronize()
    assert bool((seen == 7).all())
    assert t.wait()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("streams", ["2", "1"])
def test_chained_copies_keep_order_across_the_copy_streams(path, streams, monkeypatch):
    """Restores and saves run on two streams: a copy sharing a slot or block
    with an earlier one on the other stream must wait for it. Each copy is
    held back behind its direction's busy stream for a random time, so one
    that skipped that wait would overtake the copy it depends on."""
    monkeypatch.setenv("HOSTCACHE_COPY_STREAMS", streams)
    pool = gpu_pool("int4", 24, seed=7)
    slot = pool.shape[0] * pool.shape[2]
    store = SlotStore.from_tensors(HostCacheConfig(capacity_bytes=16 * slot_stride(slot), copy_path=path,
                                                   reserve_bytes=0),
                                   [pool], 1)
    busy = {"offload": torch.cuda.Stream(), "restore": torch.cuda.Stream()}
    for s in busy.values():
        s.wait_stream(torch.cuda.current_stream())  # the pool was made on the default stream
    rng = np.random.default_rng(13)

    def after(direction: str) -> torch.cuda.Stream:
        with torch.cuda.stream(busy[direction]):
            torch.cuda._sleep(int(rng.integers(0, 2_000_000)))  # up to about a millisecond
        return busy[direction]

    assert run_chain(store, lambda b: block_bytes(pool, b), 24, seed=11, steps=80, after=after) > 80
    for s in busy.values():
        s.synchronize()
    assert store.stats()["copy_engine"].startswith("cuda-" + path)


def test_unpinned_pool_still_copies_exactly():
    rng = np.random.default_rng(4)
    pool = gpu_pool("int4", 16)
    cache = make_cache(pool, 16, pin="off", copy_path="kernel")
    toks = tokens(rng, 4)
    saved = [block_bytes(pool, b) for b in range(4)]
    assert cache.offload(toks, range(4)).transfer.wait()
    assert cache.restore(cache.match(toks), range(10, 14)).wait()
    assert [block_bytes(pool, b) for b in range(10, 14)] == saved
    assert cache.stats()["pinned"] is False


def test_many_transfers_in_flight_on_gpu():
    rng = np.random.default_rng(5)
    pool = gpu_pool("int4", 128)
    cache = make_cache(pool, 160)
    prompts = [tokens(rng, 2) for _ in range(48)]
    saved = {i: [block_bytes(pool, 2 * i + k) for k in range(2)] for i in range(48)}
    offs = [cache.offload(p, [2 * i, 2 * i + 1]) for i, p in enumerate(prompts)]
    assert all(o.transfer.wait() for o in offs)
    pool.zero_()
    rs = [(i, cache.restore(cache.match(p, pin=True), [2 * i, 2 * i + 1])) for i, p in enumerate(prompts)]
    cache.wait_all()
    for i, t in rs:
        assert t.ok
        assert [block_bytes(pool, 2 * i + k) for k in range(2)] == saved[i]
    assert cache.stats()["transfers_in_flight"] == 0
