"""The rank side: LMDeploy's real KV pool layout (BlockCachePlan on CPU), the
copy plan riding on the forward payload, and the model agent's real hook
functions executing it."""
from __future__ import annotations

import os
import pickle
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("lmdeploy")

from lmdeploy.pytorch.config import CacheConfig, ModelConfig  # noqa: E402
from lmdeploy.pytorch.engine.cache_engine.plan import build_block_cache_plan  # noqa: E402
from lmdeploy.pytorch.engine.cache_inputs import CacheCheckpointInputs  # noqa: E402
from lmdeploy.pytorch.engine.model_agent import agent  # noqa: E402

from lmdeploy_patch import rank_tier  # noqa: E402
from lmdeploy_patch.copy_plan import HostCacheInputs, HostCopyPlan  # noqa: E402
from lmdeploy_patch.pool_sizing import host_pool_slots  # noqa: E402
from lmdeploy_patch.settings import slot_stride  # noqa: E402
from lmdeploy_patch.rank_tier import WorkerTier, build_worker_tier, pool_regions  # noqa: E402

GiB = 1 << 30


class _CacheEngine:
    """Stands in for LMDeploy's CacheEngine as the key of a rank's store."""


def llama_plan(quant_policy: int, layers: int = 4, num_blocks: int = 12):
    """LMDeploy's own plan for a Llama-3-8B-like layer (8 KV heads, dim 128)."""
    from lmdeploy.pytorch.devices import DeviceContext, get_device_manager

    mc = ModelConfig(hidden_size=4096, num_layers=layers, num_attention_heads=32, num_key_value_heads=8,
                     bos_token_id=1, eos_token_id=[2], head_dim=128, dtype=torch.bfloat16)
    cc = CacheConfig(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=num_blocks,
                     quant_policy=quant_policy, device_type="cuda")
    with get_device_manager().context(DeviceContext("cuda")):
        plan = build_block_cache_plan(mc, cc, world_size=1)
    allocation = plan.allocate(num_blocks, "cpu")
    for pool in allocation.pools:
        pool.tensor.random_(0, 256)
    return plan, allocation, cc


@pytest.mark.parametrize("quant_policy,block_mib", [(0, 8.0), (8, 4.125), (4, 2.125)])
def test_pool_regions_cover_lmdeploy_blocks(quant_policy, block_mib):
    plan, allocation, _ = llama_plan(quant_policy, layers=32, num_blocks=2)
    regions, n = pool_regions(allocation, plan.kernel_blocks_per_logical_block)
    assert n == 2 and len(regions) == 32
    assert sum(r.bytes for r in regions) == int(block_mib * 2**20)


def _block_bytes(allocation, b: int, k: int) -> bytes:
    """Scheduler block b: k consecutive kernel blocks in each layer."""
    return b"".join(p.tensor[:, b * k:(b + 1) * k, :].contiguous().numpy().tobytes() for p in allocation.pools)


@pytest.mark.parametrize("quant_policy", [0, 4])
def test_agent_hooks_run_the_plan_around_the_model(quant_policy):
    plan, allocation, cc = llama_plan(quant_policy)
    cc.host_cache_slots = 8
    worker = build_worker_tier(cc, allocation, plan.kernel_blocks_per_logical_block)
    engine = _CacheEngine()
    rank_tier.register(engine, worker)
    inputs = SimpleNamespace(is_dummy=False)
    k = plan.kernel_blocks_per_logical_block
    try:
        want = {b: _block_bytes(allocation, b, k) for b in (1, 2, 3)}
        # forward 1 saves blocks 1..3 after its model (post)
        save = HostCacheInputs.wrap(None, HostCopyPlan.build([], [], [(5, 1), (0, 2), (7, 3)]))
        agent._restore_cache_checkpoint(inputs, save, engine, None)
        agent._save_cache_checkpoint(inputs, save, engine, None)
        # forward 2 restores them elsewhere before its model (pre); its model
        # then overwrites the old blocks, which the save must have read already
        load = HostCacheInputs.wrap(None, HostCopyPlan.build([], [(5, 9), (0, 10), (7, 11)], []))
        agent._restore_cache_checkpoint(inputs, load, engine, None)
        for p in allocation.pools:
            p.tensor[:, k:4 * k].zero_()
        assert [_block_bytes(allocation, b, k) for b in (9, 10, 11)] == [want[1], want[2], want[3]]
        assert worker.blocks_saved == 3 and worker.blocks_restored == 3
        # a dummy forward runs no copies
        dummy = SimpleNamespace(is_dummy=True)
        agent._restore_cache_checkpoint(dummy, HostCacheInputs.wrap(None, HostCopyPlan.build([], [(5, 4)], [])),
                                        engine, None)
        assert worker.blocks_restored == 3
    finally:
        rank_tier.unregister(engine)


def test_plan_survives_to_device_and_pickle():
    kv = torch.tensor([[1, 2], [3, 4]])
    plan = HostCopyPlan.build([(1, 2)], [(3, 4)], [(5, 6)])
    ci = HostCacheInputs.wrap(CacheCheckpointInputs(kv_save_plan=kv), plan)
    moved = ci.to_device("cpu")
    assert isinstance(moved, HostCacheInputs) and moved.host_plan is plan
    # LMDeploy's own fields survive as they were: the one given, the others unset
    from dataclasses import fields

    assert torch.equal(moved.kv_save_plan, kv)
    others = [f.name for f in fields(CacheCheckpointInputs) if f.name != "kv_save_plan"]
    assert others and all(getattr(moved, name) is None for name in others), moved
    back = pickle.loads(pickle.dumps(moved))  # the MP executor pickles payloads
    assert list(back.host_plan.restore_slots) == [3] and list(back.host_plan.post_blocks) == [6]
    moved.record_stream(None)  # CPU plans: nothing to record


def test_host_pool_sizing_by_ratio_size_and_ram():
    cc = SimpleNamespace(host_cache_ratio=2.0, host_cache_size=None, num_gpu_blocks=100)
    # ratio: 2 x 100 blocks of 1000 bytes (slot stride 1024) -> 195 slots
    assert host_pool_slots(cc, [1000], 1, available_ram=64 * GiB) == 200_000 // 1024
    cc.host_cache_size = 1.0
    assert host_pool_slots(cc, [1 << 20, 1 << 20], 2, available_ram=64 * GiB) == 1024
    # 12 GiB available, 2 GiB reserve: 10 GiB for two ranks on this host
    with pytest.raises(ValueError, match=r"host_cache_size asks for 16.00 GiB .* set host_cache_size "
                                         r"/ --host-cache-size 5.00 or less"):
        host_pool_slots(SimpleNamespace(host_cache_ratio=0, host_cache_size=8.0, num_gpu_blocks=10),
                        [1 << 20, 1 << 20], 2, available_ram=12 * GiB)
    # ratio 6 of 1024 one-MiB blocks on each of two ranks: 12 GiB asked, 5 GiB per rank fits: ratio 5
    with pytest.raises(ValueError, match=r"host_cache_ratio asks for 12.00 GiB .* set host_cache_ratio "
                                         r"/ --host-cache-ratio 4.99 or less"):
        host_pool_slots(SimpleNamespace(host_cache_ratio=6.0, host_cache_size=None, num_gpu_blocks=1024),
                        [1 << 20, 1 << 20], 2, available_ram=12 * GiB)
    with pytest.raises(ValueError, match="smaller than one KV block"):
        host_pool_slots(SimpleNamespace(host_cache_ratio=0.001, host_cache_size=None, num_gpu_blocks=10),
                        [1 << 20], 1, available_ram=12 * GiB)


def test_the_default_ratio_shrinks_to_fit_and_an_explicit_one_is_refused(hostcache_log):
    """`--host-cache` picks the ratio (settings.DefaultRatio): a pool that does
    not fit shrinks, with one line naming the limit; the same ratio given by
    the user is refused with the largest one that fits, naming the limit too."""
    import pickle

    from lmdeploy_patch.settings import DefaultRatio, check_ratio

    default = check_ratio(DefaultRatio(4.0))
    assert isinstance(default, DefaultRatio) and default == 4.0
    assert isinstance(pickle.loads(pickle.dumps(default)), DefaultRatio)  # the executor's workers
    limit = "the cgroup v2 limit of /sys/fs/cgroup/x"
    # 4 x 1024 one-MiB blocks x 2 ranks = 8 GiB; 6 GiB available, 2 GiB reserve: 2 GiB per rank fits
    cc = SimpleNamespace(host_cache_ratio=default, host_cache_size=None, num_gpu_blocks=1024)
    slots = host_pool_slots(cc, [1 << 20, 1 << 20], 2, available_ram=6 * GiB, ram_source=limit)
    page = os.sysconf("SC_PAGESIZE")
    assert slots == (4 * GiB - 2 * page) // (2 * slot_stride(1 << 20))  # less a page per rank
    said = [line for line in hostcache_log() if "shrunk" in line]
    assert len(said) == 1 and limit in said[0] and "default ratio 4" in said[0], hostcache_log()
    cc.host_cache_ratio = 4.0  # the user's
    with pytest.raises(ValueError, match=r"limit: the cgroup v2 limit of /sys/fs/cgroup/x.*host-cache-ratio "
                                         r"1.99 or less"):  # a page per rank of slack
        host_pool_slots(cc, [1 << 20, 1 << 20], 2, available_ram=6 * GiB, ram_source=limit)
    cc.host_cache_ratio = default
    with pytest.raises(ValueError, match="no room for one KV block"):
        host_pool_slots(cc, [1 << 20, 1 << 20], 2, available_ram=2 * GiB, ram_source=limit)


def test_ram_reserve_can_be_set_and_bad_values_are_named(monkeypatch):
    cc = SimpleNamespace(host_cache_ratio=0, host_cache_size=8.0, num_gpu_blocks=10)
    monkeypatch.setenv("HOSTCACHE_RAM_RESERVE_GIB", "0")  # 16 GiB asked, 16 GiB available, nothing kept back
    page = os.sysconf("SC_PAGESIZE")  # but a page per rank: each maps its pool in whole pages
    assert host_pool_slots(cc, [1 << 20, 1 << 20], 2, available_ram=16 * GiB + 2 * page) == 8192
    with pytest.raises(ValueError, match="does not fit|asks for"):
        host_pool_slots(cc, [1 << 20, 1 << 20], 2, available_ram=16 * GiB)
    monkeypatch.setenv("HOSTCACHE_RAM_RESERVE_GIB", "1")
    with pytest.raises(ValueError, match=r"1 GiB is kept in reserve"):
        host_pool_slots(cc, [1 << 20, 1 << 20], 2, available_ram=16 * GiB)
    for bad in ("-1", "lots", "nan", "inf"):
        monkeypatch.setenv("HOSTCACHE_RAM_RESERVE_GIB", bad)
        with pytest.raises(ValueError, match=r"HOSTCACHE_RAM_RESERVE_GIB=.*number >= 0"):
            host_pool_slots(cc, [1 << 20], 1, available_ram=16 * GiB)


class _FakeTransfer:
    def __init__(self, log, name, direction):
        self.log, self.name, self.direction, self.finished = log, name, direction, False

    def done(self):
        return self.finished

    def wait(self):
        self.log.append(("wait", self.name))
        self.finished = True
        return True

    def wait_on_stream(self, stream):
        self.log.append(("stream_wait", self.name))

    def queue_error(self):
        return ""


class _FakeStore:
    num_slots = 16

    def __init__(self):
        self.log, self.n = [], 0
        self.pin = {"register_error": "", "pin_error": ""}

    def slot_checksum(self, slot):
        return 0

    def stats(self):
        return dict(self.pin)

    def _t(self, kind):
        self.n += 1
        self.log.append((kind, self.n))
        return _FakeTransfer(self.log, self.n, kind)

    def offload(self, slots, blocks, after_stream=None):
        return self._t("offload")

    def restore(self, slots, blocks, after_stream=None):
        return self._t("restore")


def _ordering_only(worker: WorkerTier) -> WorkerTier:
    """These tests are about what a forward waits for, with a fake store: its
    ledger takes every slot as saved into already (slot_ledger.unservable)."""
    worker.ledger._carried[:] = 1
    return worker


def _plan(pre=(), restore=(), post=(), wait_saves=True):
    return HostCopyPlan.build(list(pre), list(restore), list(post), wait_saves=wait_saves)


def test_cpu_forward_waits_for_every_unordered_copy():
    """The CPU store orders only copies sharing a slot or block: a forward
    waits for each earlier copy, not only the newest."""
    store = _FakeStore()
    w = _ordering_only(WorkerTier(store, cuda=False))
    w.before_model(_plan(), None)
    w.after_model(_plan(post=[(1, 2)]), None)                     # copy 1: post save of forward 1
    w.before_model(_plan(pre=[(3, 4)], restore=[(5, 6)]), None)   # copies 2, 3
    assert ("wait", 1) in store.log and ("wait", 2) in store.log and ("wait", 3) in store.log


def test_forward_skips_waiting_for_saves_when_no_block_was_freed():
    store = _FakeStore()
    w = _ordering_only(WorkerTier(store, cuda=False))
    w.after_model(_plan(post=[(1, 2)]), None)
    w.before_model(_plan(wait_saves=False), None)  # no eviction since: the save may run on
    assert not [e for e in store.log if e[0] == "wait"]
    w.before_model(_plan(wait_saves=True), None)   # an eviction: its block may be reused now
    assert ("wait", 1) in store.log
    store.log.clear()
    w.after_model(_plan(post=[(1, 2)]), None)
    # Own restores are always waited for; saves still not, and the next forward that must wait covers them.
    w.before_model(_plan(restore=[(3, 4)], wait_saves=False), None)
    assert ("wait", 3) in store.log and ("wait", 2) not in store.log
    w.before_model(_plan(pre=[(5, 6)], wait_saves=False), None)  # pre saves: wait for every save
    assert ("wait", 2) in store.log and ("wait", 4) in store.log
    store.log.clear()
    w.after_model(_plan(post=[(1, 2)]), None)
    w.before_model(None, None)  # a forward without a plan waits for everything
    assert ("wait", 5) in store.log


class _TimingEvent:
    """Stands in for torch.cuda.Event, which needs a GPU: the stream-wait
    bookkeeping under test is plain Python."""

    def __init__(self, enable_timing=False):
        pass

    def record(self, stream=None):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 1.0


def test_cuda_forward_waits_on_the_newest_copy_of_each_stream(monkeypatch):
    """Restores and saves run on two streams, each in order: a forward waits
    on the newest restore, and on the newest save only when it must."""
    import torch

    monkeypatch.setattr(torch.cuda, "Event", _TimingEvent)
    store = _FakeStore()
    w = _ordering_only(WorkerTier(store, cuda=True))
    w.after_model(_plan(post=[(1, 2)]), "fwd")                        # 1: save
    w.after_model(_plan(post=[(3, 4)]), "fwd")                        # 2: save, behind 1 on its stream
    w.before_model(_plan(restore=[(5, 6)], wait_saves=False), "fwd")  # 3: restore
    assert [e for e in store.log if e[0] == "stream_wait"] == [("stream_wait", 3)]
    store.log.clear()
    w.before_model(_plan(wait_saves=True), "fwd")  # an eviction: the newest save covers both
    assert [e for e in store.log if e[0] == "stream_wait"] == [("stream_wait", 2)]
    store.log.clear()
    w.before_model(_plan(wait_saves=True), "fwd")  # nothing left to wait for
    assert not store.log
    assert w.wait_seconds() == pytest.approx(2e-3)  # two waits of 1 ms each


def test_pinning_fallbacks_are_said_once_each(monkeypatch, caplog):
    """A lazy pool meets a refused registration while serving: one line for
    the move to pinned allocations, one when those fail too, never repeated."""
    import logging

    import torch

    monkeypatch.setattr(torch.cuda, "Event", _TimingEvent)
    monkeypatch.setattr("lmdeploy_patch.log._said", set())
    store = _FakeStore()
    w = _ordering_only(WorkerTier(store, cuda=True))
    with caplog.at_level(logging.WARNING, logger="lmdeploy_hostcache"):
        store.pin["register_error"] = "cudaHostRegister: operation not supported"
        for _ in range(70):
            w.after_model(_plan(post=[(1, 2)]), "fwd")
        store.pin["pin_error"] = "cudaHostAlloc: out of memory"
        for _ in range(70):
            w.after_model(_plan(post=[(1, 2)]), "fwd")
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert "pinned allocations" in lines[0] and "operation not supported" in lines[0]
    assert "pageable" in lines[1] and "out of memory" in lines[1]


def test_tier_stays_off_with_a_connector_memdecode_or_dllm():
    from lmdeploy.messages import KVTransferConfig
    from lmdeploy_patch.eligibility import off_reason
    from lmdeploy_patch.pool_sizing import size_host_pool

    cc = CacheConfig(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=10,
                     kv_transfer_config=KVTransferConfig(kv_connector="MooncakeStoreConnector", kv_role="kv_both"))
    assert "connector" in off_reason(cc)
    cc = CacheConfig(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=10)
    assert off_reason(cc) is None
    cc.host_cache_ratio = 1.0
    size_host_pool(cc, [1 << 20], None, memory_model_cache=True)
    assert "MemDecode" in cc.host_cache_off_reason and cc.host_cache_slots == 0
    cc = CacheConfig(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=10)
    cc.host_cache_ratio = 1.0
    size_host_pool(cc, [1 << 20], None, model_paradigm="dllm")
    assert "dllm" in cc.host_cache_off_reason and cc.host_cache_slots == 0


def test_a_store_beside_lmdeploys_connector_is_said_unused_and_needs_local_ranks(hostcache_log):
    """One KV connector in play: with LMDeploy's own configured the tier is
    off, and the line says the store is not used either; a store needs the
    ranks in the scheduler's process (docs/store_tier.md)."""
    from lmdeploy.messages import KVTransferConfig
    from lmdeploy_patch.pool_sizing import size_host_pool

    cc = CacheConfig(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=10,
                     kv_transfer_config=KVTransferConfig(kv_connector="MooncakeStoreConnector", kv_role="kv_both"))
    cc.host_cache_ratio, cc.host_cache_store = 1.0, "/etc/mooncake.json"
    size_host_pool(cc, [1 << 20], None)
    assert cc.host_cache_slots == 0 and "host_cache_store is not used either" in cc.host_cache_off_reason
    assert any("LMDeploy's own KV connector is the only one in play" in line for line in hostcache_log())
    cc = CacheConfig(max_batches=4, block_size=64, num_cpu_blocks=0, num_gpu_blocks=10)
    cc.host_cache_ratio, cc.host_cache_store = 1.0, "/etc/mooncake.json"
    with pytest.raises(ValueError, match="host_cache_store fetches into the ranks' host pools from the scheduler"):
        size_host_pool(cc, [1 << 20], None, ranks_here=False)
    model = SimpleNamespace(hf_config=SimpleNamespace(to_dict=lambda: {"_name_or_path": "/m/tiny", "hidden": 8}),
                            dtype="torch.bfloat16")
    size_host_pool(cc, [1 << 20], None, model_config=model)
    named = cc.host_cache_store_namespace
    cc.quant_policy = 4
    size_host_pool(cc, [1 << 20], None, model_config=model)
    assert cc.host_cache_slots > 0 and named and cc.host_cache_store_namespace != named


def test_drop_worker_closes_the_store():
    plan, allocation, cc = llama_plan(0)
    cc.host_cache_slots = 4
    worker = build_worker_tier(cc, allocation, plan.kernel_blocks_per_logical_block)
    key = _CacheEngine()
    rank_tier.register(key, worker)
    worker.after_model(HostCopyPlan.build([], [], [(0, 1)]), None)
    assert rank_tier.unregister(key) and rank_tier.worker_for(key) is None
    assert not rank_tier.unregister(key) and not rank_tier.unregister(None)


def test_weights_updated_in_place_stop_the_store_for_good(hostcache_log):
    """The store's keys name the model by name and config: an engine whose
    weights change in place (update_params, update_weights_*) closes its
    link, the scheduler side sees no link, and a wakeup does not connect again."""
    from lmdeploy.pytorch.engine.model_agent.agent import BaseModelAgent
    from lmdeploy_patch import store_link
    from lmdeploy_patch.store_link import StoreLink
    from lmdeploy_patch.store_tier import StoreTier

    for name in ("update_params", "update_weights_from_ipc", "update_weights_from_distributed"):
        assert hasattr(getattr(BaseModelAgent, name), "__wrapped__"), name  # hooked (hooks/model_agent.py)
    plan, allocation, cc = llama_plan(0)
    cc.host_cache_slots, cc.host_cache_store, cc.host_cache_store_namespace = 4, "/unused.json", "ns"
    worker = build_worker_tier(cc, allocation, plan.kernel_blocks_per_logical_block)
    closed = []
    worker.link = StoreLink(SimpleNamespace(close=lambda: closed.append(1)), "p/", worker.store.slot_address,
                            worker.store.slot_bytes)
    store_link.register(id(cc), worker.link)
    tier = StoreTier(id(cc), "ns", 4, 64, 0.1, 1, cache_config=cc)
    assert tier.links() == [worker.link]
    agent = _CacheEngine()  # an agent: weakly referable, with its cache config
    agent.cache_config = cc
    rank_tier.register(_CacheEngine(), worker, agent)
    rank_tier.weights_changed(agent)
    assert worker.link is None and tier.links() == [] and closed == [1]
    assert cc.host_cache_store_off == "its weights were updated"
    rank_tier.connect_store(cc, worker, 0)  # as at a wakeup: the file is not even read
    assert worker.link is None
    assert any("stops using the Mooncake Store" in line for line in hostcache_log())
    rank_tier.drop_from_agent(agent)
