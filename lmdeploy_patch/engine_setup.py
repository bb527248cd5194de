"""Deciding whether an engine gets the host tier, sizing its pool, and
building its scheduler side. Called from the hooks; imports LMDeploy lazily."""
from __future__ import annotations

import logging
from typing import Any, Optional

from .config_fields import GIB as GiB
from .config_fields import host_cache_requested as requested

logger = logging.getLogger("lmdeploy_hostcache")
_said: set[str] = set()

SLOT_ALIGN = 256  # the core's slot stride alignment (host_arena.cpp)


def log_once(message: str) -> None:
    if message not in _said:
        _said.add(message)
        logger.warning("lmdeploy-hostcache: %s", message)




def off_reason(cache_config: Any) -> Optional[str]:
    """Why an engine that asked for the tier cannot have it, or None."""
    from lmdeploy.pytorch.disagg.config import EngineRole

    if len(cache_config.states_shapes) > 0:
        return "hybrid/SSM models keep recurrent state that the host tier does not save"
    if cache_config.window_size > 1:
        return "sliding-window attention overwrites blocks in place"
    if cache_config.role != EngineRole.Hybrid:
        return f"disaggregated {cache_config.role.name} engines hand KV to their peer instead"
    transfer = getattr(cache_config, "kv_transfer_config", None)
    if transfer is not None and getattr(transfer, "is_kv_transfer_instance", False):
        # The connector's external loads write blocks past the local match
        # and its admission path (load started, snapshot rollback) never
        # reaches the forward that would carry a host restore.
        return "an external KV connector (kv_transfer_config) manages the tier below the GPU cache"
    return None


def host_pool_slots(cache_config: Any, block_bytes_per_rank: list[int], ranks_on_this_host: int,
                    available_ram: int) -> int:
    """Slots per rank: host_cache_size GiB, or host_cache_ratio x the rank's
    GPU KV bytes, cut into slots of one block. Every rank gets the same count
    (the scheduler's index addresses all ranks with one slot id). Refuses a
    pool that does not fit in RAM minus a reserve."""
    from .config_fields import RAM_RESERVE_BYTES

    strides = [(b + SLOT_ALIGN - 1) // SLOT_ALIGN * SLOT_ALIGN for b in block_bytes_per_rank]
    size = getattr(cache_config, "host_cache_size", None)
    if size is not None:
        per_rank = [int(size * GiB)] * len(strides)
        setting = "host_cache_size"
    else:
        ratio = cache_config.host_cache_ratio
        per_rank = [int(ratio * cache_config.num_gpu_blocks * b) for b in block_bytes_per_rank]
        setting = "host_cache_ratio"
    slots = min(p // s for p, s in zip(per_rank, strides))
    if slots < 1:
        raise ValueError(f"{setting} gives a host pool smaller than one KV block ({strides[0]} bytes); raise it")
    need = slots * max(strides) * ranks_on_this_host
    if need + RAM_RESERVE_BYTES > available_ram:
        fits = max(0, available_ram - RAM_RESERVE_BYTES)
        if setting == "host_cache_size":
            most = f"host_cache_size / --host-cache-size {fits / ranks_on_this_host / GiB:.2f} or less"
        else:  # the largest ratio whose pool fits, as the user would type it
            gpu_bytes = ranks_on_this_host * cache_config.num_gpu_blocks * max(strides)
            most = f"host_cache_ratio / --host-cache-ratio {int(fits / gpu_bytes * 100) / 100:.2f} or less"
        raise ValueError(
            f"{setting} asks for {need / GiB:.2f} GiB of host memory ({ranks_on_this_host} rank(s) x "
            f"{slots} blocks) but {available_ram / GiB:.2f} GiB is available and {RAM_RESERVE_BYTES / GiB:.0f} GiB "
            f"is kept in reserve ({fits / GiB:.2f} GiB usable); set {most}")
    return slots


def prepare_scheduler_cache_config(cache_config: Any) -> None:
    """Before the Scheduler is built: the tier needs the prefix cache."""
    if not requested(cache_config) or cache_config.__dict__.get("_hc_off"):
        return  # already turned off, and said why, when the pool was sized
    reason = off_reason(cache_config)
    if reason is None and getattr(cache_config, "host_cache_slots", 0) <= 0:
        reason = "no host pool was sized for this engine (host_cache_slots is unset)"
    if reason is not None:
        cache_config._hc_off = reason
        log_once(f"host cache off for this engine: {reason}; serving without it")
        return
    if not cache_config.enable_prefix_caching:
        log_once("the host cache extends the prefix cache: turning enable_prefix_caching on")
        cache_config.enable_prefix_caching = True


def attach_scheduler_tier(scheduler: Any) -> None:
    """After the Scheduler is built: give its trie a HostTier."""
    cc = scheduler.cache_config
    if not requested(cc) or cc.__dict__.get("_hc_off") or not scheduler.block_trie.enabled:
        return
    from .host_tier import HostTier

    tier = HostTier(num_slots=cc.host_cache_slots, block_size=cc.block_size,
                    write_policy=getattr(cc, "host_cache_write_policy", "write_through"),
                    bytes_per_block=getattr(cc, "host_cache_block_bytes", 0),
                    allocator=scheduler.block_manager.allocator)
    scheduler._hc_tier = tier
    scheduler.block_trie._hc_tier = tier
    scheduler.sequence_lifecycle._hc_tier = tier
    for root in scheduler.block_trie._roots.values():
        root._hc_tier = tier
    log_once(f"host cache on: {cc.host_cache_slots} blocks per rank, write policy {tier.write_policy}")


def size_host_pool(cache_config: Any, block_bytes_per_rank: list[int], spec_cache_config: Any,
                   memory_model_cache: bool = False, model_paradigm: str = "ar") -> None:
    """In the driver, once num_gpu_blocks is final: decide the tier and the
    slot count that the scheduler and every rank will use."""
    if not requested(cache_config):
        return
    reason = off_reason(cache_config)
    if reason is None and spec_cache_config is not None:
        reason = "speculative decoding keeps a draft-model KV cache that the host tier does not save"
    if reason is None and model_paradigm != "ar":
        # dLLM decoding refills masked positions of a block across forwards;
        # only autoregressive blocks are known to be final once attached.
        reason = f"{model_paradigm} decoding is not supported by the host tier (autoregressive models only)"
    if reason is None and memory_model_cache:
        reason = "MemDecode keeps a memory-model KV cache in the same blocks that the host tier does not save"
    if reason is not None:
        cache_config._hc_off = reason
        log_once(f"host cache off for this engine: {reason}; serving without it")
        return
    from lmdeploy_hostcache import available_ram_bytes

    slots = host_pool_slots(cache_config, block_bytes_per_rank, len(block_bytes_per_rank), available_ram_bytes())
    cache_config.host_cache_slots = slots
    cache_config.host_cache_block_bytes = sum(block_bytes_per_rank)
    total = slots * sum(block_bytes_per_rank)
    log_once(f"host pool: {slots} blocks per rank, {total / GiB:.2f} GiB over {len(block_bytes_per_rank)} rank(s) "
             f"({slots / max(1, cache_config.num_gpu_blocks):.2f}x the GPU cache)")


def build_rank_store(agent: Any):
    """On each rank, after its KV pools exist: the SlotStore over them.
    A rank that cannot build it stops the engine: the scheduler would plan
    restores that nobody executes."""
    cc = agent.cache_config
    if not requested(cc) or cc.__dict__.get("_hc_off") or getattr(cc, "host_cache_slots", 0) <= 0:
        return None
    from .copy_plan import build_worker_tier
    from .engine_hooks import copy_path, pin_mode

    try:
        return build_worker_tier(cc, agent.cache_engine.gpu_allocation,
                                 agent.block_cache_plan.kernel_blocks_per_logical_block, copy_path(),
                                 pin=pin_mode())
    except Exception as e:
        raise RuntimeError(f"lmdeploy-hostcache: the host cache could not be set up on rank {agent.rank}: {e}. "
                           "Lower host_cache_ratio/host_cache_size or start without the host cache.") from e
