"""Whether an engine gets the host tier, and the slot count every part of it
reads back from LMDeploy's CacheConfig.

The driver decides once, in pool sizing (pool_sizing.py), before the cache
config reaches the scheduler and the ranks: it sets `host_cache_slots` (and
`host_cache_block_bytes`) on the config, 0 when the tier is off. The config
is pickled to every worker with that attribute, so the scheduler side and
every rank read the same decision (`tier_slots`); `host_cache_off_reason`
says why an engine that asked for the tier is without it.
"""
from __future__ import annotations

from typing import Any, Optional

from .log import log_once
from .settings import host_cache_requested


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


def turn_off(cache_config: Any, reason: str) -> None:
    """The tier stays off for this engine; said once."""
    cache_config.host_cache_slots = 0
    cache_config.host_cache_off_reason = reason
    log_once(f"host cache off for this engine: {reason}; serving without it")


def tier_slots(cache_config: Any) -> int:
    """Host slots per rank of this engine; 0 when the tier is off or was never sized."""
    if not host_cache_requested(cache_config):
        return 0
    return int(getattr(cache_config, "host_cache_slots", 0) or 0)
