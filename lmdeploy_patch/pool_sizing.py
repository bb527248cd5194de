"""How many host slots each rank gets: decided once in the driver, after
LMDeploy fixed num_gpu_blocks and before the cache config goes to the
scheduler and the workers (hooks/executor_base.py). The decision travels on
the cache config (eligibility.py)."""
from __future__ import annotations

import os
from typing import Any, Optional

from . import store_keys
from .eligibility import off_reason, turn_off
from .log import log_once
from .settings import GIB, DefaultRatio, host_cache_requested, ram_budget, ram_reserve_bytes, slot_stride


def page_size() -> int:
    return os.sysconf("SC_PAGESIZE")


def host_pool_slots(cache_config: Any, block_bytes_per_rank: list[int], ranks_on_this_host: int,
                    available_ram: int, ram_source: str = "MemAvailable") -> int:
    """Slots per rank: host_cache_size GiB, or host_cache_ratio x the rank's
    GPU KV bytes, cut into slots of one block. Every rank gets the same count
    (the scheduler's index addresses all ranks with one slot id). A pool
    that does not fit in RAM minus a reserve, for every rank on this host,
    is refused with the largest value that fits, unless its ratio is the
    one `--host-cache` chose (settings.DefaultRatio): that shrinks to fit,
    with one line. `ram_source` names the limit `available_ram` came from."""
    reserve = ram_reserve_bytes()
    strides = [slot_stride(b) for b in block_bytes_per_rank]
    size = getattr(cache_config, "host_cache_size", None)
    if size is not None:
        per_rank = [int(size * GIB)] * len(strides)
        setting = "host_cache_size"
    else:
        ratio = cache_config.host_cache_ratio
        per_rank = [int(ratio * cache_config.num_gpu_blocks * b) for b in block_bytes_per_rank]
        setting = "host_cache_ratio"
    slots = min(p // s for p, s in zip(per_rank, strides))
    if slots < 1:
        raise ValueError(f"{setting} gives a host pool smaller than one KV block ({strides[0]} bytes); raise it")
    # Each rank maps its pool rounded up to whole pages: a page each of slack.
    slack = ranks_on_this_host * page_size()
    need = slots * max(strides) * ranks_on_this_host
    if need + slack + reserve <= available_ram:
        return slots
    fits = max(0, available_ram - reserve - slack)
    if setting == "host_cache_ratio" and isinstance(ratio, DefaultRatio):
        shrunk = fits // (max(strides) * ranks_on_this_host)
        if shrunk < 1:
            raise ValueError(
                f"--host-cache finds no room for one KV block per rank: {available_ram / GIB:.2f} GiB available "
                f"({ram_source}), {reserve / GIB:g} GiB kept in reserve; free memory, lower "
                f"HOSTCACHE_RAM_RESERVE_GIB, or start without the host cache")
        log_once(f"host pool: the default ratio {float(ratio):g} asks for {need / GIB:.2f} GiB but "
                 f"{fits / GIB:.2f} GiB fits ({available_ram / GIB:.2f} GiB available, limit: {ram_source}; "
                 f"{reserve / GIB:g} GiB reserve): shrunk to {shrunk} blocks per rank "
                 f"(ratio {shrunk / max(1, cache_config.num_gpu_blocks):.2f})")
        return int(shrunk)
    if setting == "host_cache_size":
        most = f"host_cache_size / --host-cache-size {fits / ranks_on_this_host / GIB:.2f} or less"
    else:  # the largest ratio whose pool fits, as the user would type it
        gpu_bytes = ranks_on_this_host * cache_config.num_gpu_blocks * max(strides)
        most = f"host_cache_ratio / --host-cache-ratio {int(fits / gpu_bytes * 100) / 100:.2f} or less"
    raise ValueError(
        f"{setting} asks for {need / GIB:.2f} GiB of host memory ({ranks_on_this_host} rank(s) x "
        f"{slots} blocks) but {available_ram / GIB:.2f} GiB is available (limit: {ram_source}) and "
        f"{reserve / GIB:.0f} GiB is kept in reserve ({fits / GIB:.2f} GiB usable); set {most}")


def store_namespace(cache_config: Any, model_config: Any, tp: int, slot_bytes: int,
                    adapters: Optional[dict] = None) -> Optional[str]:
    """What an engine's store keys share (store_keys.engine_namespace): its
    model, adapters, KV dtype, quant policy, block size, tensor-parallel
    size, slot bytes; None (no store) when the model cannot be named."""
    hf_config = getattr(model_config, "hf_config", None)
    if hf_config is None:
        log_once("host_cache_store: this engine's model config cannot be read to name its store keys; the store is "
                 "not used")
        return None
    name, digest = store_keys.model_identity(hf_config)
    if adapters:  # an adapter is known to requests by name: its name and where it came from name its blocks
        digest += "+" + store_keys.adapters_digest(adapters)
    dtype = str(getattr(model_config, "dtype", ""))
    return store_keys.engine_namespace(name, digest, dtype, int(cache_config.quant_policy), cache_config.block_size,
                                       tp, slot_bytes)


def size_host_pool(cache_config: Any, block_bytes_per_rank: list[int], spec_cache_config: Any,
                   memory_model_cache: bool = False, model_paradigm: str = "ar", engines: int = 1,
                   ranks_here: bool = True, model_config: Any = None, tp: int = 1,
                   adapters: Optional[dict] = None) -> None:
    """In the driver, once num_gpu_blocks is final: decide the tier and the
    slot count that the scheduler and every rank will use. `engines`: the
    data-parallel engines, each sizing its own pool from the same RAM; all
    are counted as on this host (conservative when they span machines).
    `ranks_here`: the ranks run in this process (the single-process executor)."""
    if not host_cache_requested(cache_config):
        return
    if getattr(cache_config, "host_cache_verify", False) and not ranks_here:
        # The checks run where the scheduler is, against the ranks' ledgers (slot_ledger.py).
        raise ValueError("host_cache_verify=True checks host slots from the scheduler, which needs this engine's "
                         "ranks in its process (one GPU, or the CPU engine); with ranks in other processes set "
                         "host_cache_verify=False")
    store = getattr(cache_config, "host_cache_store", None)
    if store and not ranks_here:
        # Fetches fill the ranks' host slots from the scheduler's process (store_tier.py).
        raise ValueError("host_cache_store fetches into the ranks' host pools from the scheduler, which needs this "
                         "engine's ranks in its process (one GPU, or the CPU engine); with ranks in other processes "
                         "leave host_cache_store unset")
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
        if store:
            reason += ("; host_cache_store is not used either: LMDeploy's own KV connector is the only one in play"
                       if "connector" in reason else "; so is its store (host_cache_store)")
        turn_off(cache_config, reason)
        return
    available, source = ram_budget()
    slots = host_pool_slots(cache_config, block_bytes_per_rank, len(block_bytes_per_rank) * engines, available,
                            source)
    cache_config.host_cache_slots = slots
    cache_config.host_cache_block_bytes = sum(block_bytes_per_rank)
    cache_config.host_cache_rank_block_bytes = max(block_bytes_per_rank)  # ranks copy their shares in parallel
    # The scheduler's process: a rank there whose pool fails can turn the tier off (rank_tier.attach_to_agent).
    cache_config.host_cache_pid = os.getpid()
    if store:
        cache_config.host_cache_store_namespace = store_namespace(cache_config, model_config, tp,
                                                                  max(block_bytes_per_rank), adapters)
    total = slots * sum(block_bytes_per_rank)
    log_once(f"host pool: {slots} blocks per rank, {total / GIB:.2f} GiB over {len(block_bytes_per_rank)} rank(s) "
             f"({slots / max(1, cache_config.num_gpu_blocks):.2f}x the GPU cache)")
