"""The tier's figures on LMDeploy's /metrics, as lmdeploy:host_cache_*.

The scheduler's figures (scheduler_tier.HostTier.metrics, plus the local
ranks' wait times) ride on LMDeploy's ScheduleMetrics and SchedulerStats
(hooks/scheduler.py, hooks/metrics_stats.py) to its PrometheusStatLogger
(hooks/metrics_loggers.py), which sets one gauge per figure. Host hits also
count in LMDeploy's own prefix_cache_hit_rate and per-request
cached_tokens (scheduler_tier.continue_match). Gauges are registered on the
first record, and only with the tier on: a tier-off server exports nothing new.
"""
from __future__ import annotations

import weakref
from typing import Any

from .lost_hits import CAUSES

# metric name suffix -> (key in HostTier.metrics(), help text)
GAUGES = {
    "hit_tokens": ("host_hit_tokens", "Prompt tokens served from the host KV tier (cumulative)."),
    "queried_tokens": ("host_queried_tokens", "Tokens looked up in the host tier after the GPU prefix cache (cumulative)."),
    "hit_rate": ("host_hit_rate", "Host-tier hit tokens / queried tokens."),
    "blocks_saved": ("host_blocks_saved", "KV blocks copied to host memory (cumulative)."),
    "blocks_restored": ("host_blocks_restored", "KV blocks copied back from host memory (cumulative)."),
    "bytes_saved": ("host_bytes_saved", "Bytes copied to host memory over all ranks (cumulative)."),
    "bytes_restored": ("host_bytes_restored", "Bytes copied back from host memory over all ranks (cumulative)."),
    "evictions": ("host_evictions", "Host-tier blocks evicted to make room (cumulative)."),
    "saves_dropped": ("host_saves_dropped", "Saves skipped because no host slot could be freed (cumulative)."),
    "slots_used": ("host_slots_used", "Host-tier blocks held."),
    "slots_total": ("host_slots_total", "Host-tier capacity in blocks."),
    "occupancy": ("host_occupancy", "Host-tier blocks held / capacity."),
    "restore_wait_seconds": ("host_restore_wait_seconds",
                             "Seconds forwards waited for host copies, this process's ranks (cumulative)."),
    "tails_saved": ("host_tails_saved", "Partial last blocks saved when their sequence's blocks were reclaimed "
                                        "(cumulative)."),
    "tail_hit_tokens": ("host_tail_hit_tokens", "Of hit_tokens, those from partial last blocks (cumulative)."),
    **{f"lost_{cause}_tokens": (f"host_lost_{cause}_tokens",
                                f"Prompt tokens a never-evicting GPU cache would have served, recomputed: {cause} "
                                "(cumulative; lmdeploy_patch/lost_hits.py).") for cause in CAUSES},
}

_LABELS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()
_GAUGES: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def remember_labels(logger: Any, model_name: str, dp_rank: int) -> None:
    """A new stat logger: the labels its gauges get; any gauges it had are gone."""
    _LABELS[logger] = [model_name, str(dp_rank)]
    _GAUGES.pop(logger, None)


def set_host_gauges(logger: Any, host: dict) -> None:
    import prometheus_client

    gauges = _GAUGES.get(logger)
    if gauges is None:
        labels = _LABELS.get(logger, ["", "0"])
        gauges = _GAUGES[logger] = {suffix: _gauge(prometheus_client, f"lmdeploy:host_cache_{suffix}", doc)
                                    .labels(*labels) for suffix, (_, doc) in GAUGES.items()}
    for suffix, (key, _) in GAUGES.items():
        if key in host:
            gauges[suffix].set(host[key])


def _gauge(prometheus_client: Any, name: str, doc: str) -> Any:
    """The registered gauge of that name, or a new one. Several stat loggers
    in one process (one per DP rank) share the gauge through their labels;
    registering it twice would raise. (A new PrometheusStatLogger unregisters
    every lmdeploy collector, ours included, so a gauge is recreated then.)"""
    existing = getattr(prometheus_client.REGISTRY, "_names_to_collectors", {}).get(name)
    if isinstance(existing, prometheus_client.Gauge):
        return existing
    return prometheus_client.Gauge(name=name, documentation=doc, labelnames=["model_name", "engine"])
