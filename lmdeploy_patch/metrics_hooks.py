"""Host-tier statistics through LMDeploy's own metrics path:

Scheduler.schedule_metrics (engine process) -> ScheduleMetrics, pickled to the
API server -> SchedulerStats.update_from_schedule_metrics ->
PrometheusStatLogger.record_schedule -> /metrics as lmdeploy:host_cache_*.

Host hits also count in LMDeploy's own prefix_cache_hit_rate and per-request
cached_tokens (host_tier.continue_match). Gauges are registered on the first
report that carries host-tier figures, so with the tier off /metrics is
exactly LMDeploy's.
"""
from __future__ import annotations

from typing import Any

from .compat import STATE, apply, hooked, require_attr
from .import_hooks import when_imported
from .trie_hooks import tier_of

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
}


@when_imported("lmdeploy.pytorch.paging.scheduler")
def _patch_schedule_metrics(module) -> None:
    def patch() -> None:
        Scheduler = require_attr(module, "Scheduler", "lmdeploy.pytorch.paging.scheduler")
        prop = require_attr(Scheduler, "schedule_metrics", "Scheduler")
        if not isinstance(prop, property):
            from .compat import IncompatibleLMDeploy

            raise IncompatibleLMDeploy("Scheduler.schedule_metrics is no longer a property")

        def schedule_metrics(self):
            metrics = prop.fget(self)
            tier = tier_of(self)
            if tier is not None:
                metrics.host_cache = tier.metrics()
            return metrics

        STATE.patcher.setattr(Scheduler, "schedule_metrics", property(schedule_metrics))

    apply("metrics.schedule", patch)


@when_imported("lmdeploy.metrics.stats")
def _patch_stats(module) -> None:
    def patch() -> None:
        Stats = require_attr(module, "SchedulerStats", "lmdeploy.metrics.stats")
        update = hooked(Stats, "update_from_schedule_metrics", ["self", "scheduled_metrics"], "SchedulerStats")

        def update_from_schedule_metrics(self, scheduled_metrics):
            update(self, scheduled_metrics)
            host = getattr(scheduled_metrics, "host_cache", None)
            if host is not None:
                self.host_cache = host

        STATE.patcher.setattr(Stats, "update_from_schedule_metrics", update_from_schedule_metrics)

    apply("metrics.stats", patch)


@when_imported("lmdeploy.metrics.loggers")
def _patch_prometheus(module) -> None:
    def patch() -> None:
        Logger = require_attr(module, "PrometheusStatLogger", "lmdeploy.metrics.loggers")
        init = hooked(Logger, "__init__", ["self", "model_name", "max_model_len", "dp_rank"], "PrometheusStatLogger")
        record = hooked(Logger, "record_schedule", ["self", "stats"], "PrometheusStatLogger")

        def __init__(self, model_name, max_model_len, dp_rank=0):
            init(self, model_name, max_model_len, dp_rank)
            self._hc_labels = [model_name, str(dp_rank)]
            self._hc_gauges = None

        def record_schedule(self, stats):
            record(self, stats)
            host = getattr(stats, "host_cache", None)
            if host is not None:
                set_host_gauges(self, host)

        STATE.patcher.setattr(Logger, "__init__", __init__)
        STATE.patcher.setattr(Logger, "record_schedule", record_schedule)

    apply("metrics.prometheus", patch)


def set_host_gauges(logger: Any, host: dict) -> None:
    import prometheus_client

    if logger.__dict__.get("_hc_gauges") is None:
        labels = logger.__dict__.get("_hc_labels", ["", "0"])
        logger._hc_gauges = {suffix: _gauge(prometheus_client, f"lmdeploy:host_cache_{suffix}", doc).labels(*labels)
                             for suffix, (_, doc) in GAUGES.items()}
    for suffix, (key, _) in GAUGES.items():
        if key in host:
            logger._hc_gauges[suffix].set(host[key])


def _gauge(prometheus_client: Any, name: str, doc: str) -> Any:
    """The registered gauge of that name, or a new one. Several stat loggers
    in one process (one per DP rank) share the gauge through their labels;
    registering it twice would raise. (A new PrometheusStatLogger unregisters
    every lmdeploy collector, ours included, so a gauge is recreated then.)"""
    existing = getattr(prometheus_client.REGISTRY, "_names_to_collectors", {}).get(name)
    if isinstance(existing, prometheus_client.Gauge):
        return existing
    return prometheus_client.Gauge(name=name, documentation=doc, labelnames=["model_name", "engine"])
