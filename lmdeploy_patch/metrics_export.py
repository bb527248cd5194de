"""The tier's figures on LMDeploy's /metrics, as lmdeploy:host_cache_*, in
Prometheus' conventions: what only grows is a counter (exported with
`_total`), a size or a level is a gauge, a distribution is a histogram.

The scheduler's figures (scheduler_tier.HostTier.metrics, plus the local
ranks' figures: rank_tier.local_figures) ride on LMDeploy's ScheduleMetrics
and SchedulerStats (hooks/scheduler.py, hooks/metrics_stats.py) to its
PrometheusStatLogger (hooks/metrics_loggers.py), which hands each snapshot
here. One collector, registered on the first snapshot (so a tier-off server
exports nothing new), reports the latest snapshot of every live logger
under its labels: the tier's figures are cumulative already, and a
collector exports them as they are instead of replaying them as increments.
Host hits also count in LMDeploy's own prefix_cache_hit_rate and per-request
cached_tokens (scheduler_tier.continue_match).

The names changed once, when these conventions came in (README, Changelog):
RENAMED lists each old name with its new one.
"""
from __future__ import annotations

import threading
import weakref
from typing import Any, Iterator

from .lost_hits import CAUSES
from .store_link import FAILURE_KINDS

# The lost-hit causes that existed before the rename (recomputed_by_choice came with it).
_CAUSES_BEFORE = ("never_saved", "save_dropped", "evicted_from_host", "partial_block", "preempted")

PREFIX = "lmdeploy:host_cache_"
LABELS = ["model_name", "engine"]

# name (after PREFIX, without _total) -> (key in the snapshot, help text)
COUNTERS = {
    "hit_tokens": ("host_hit_tokens", "Prompt tokens served from the host KV tier."),
    "queried_tokens": ("host_queried_tokens", "Tokens looked up in the host tier after the GPU prefix cache."),
    "blocks_saved": ("host_blocks_saved", "KV blocks copied to host memory."),
    "blocks_restored": ("host_blocks_restored", "KV blocks copied back from host memory."),
    "saved_bytes": ("host_bytes_saved", "Bytes copied to host memory over all ranks."),
    "restored_bytes": ("host_bytes_restored", "Bytes copied back from host memory over all ranks."),
    "evictions": ("host_evictions", "Host-tier blocks evicted to make room."),
    "saves_dropped": ("host_saves_dropped", "Saves skipped because no host slot could be freed."),
    "restore_wait_seconds": ("host_restore_wait_seconds",
                             "Seconds forwards waited for host copies (this process's ranks)."),
    "tails_saved": ("host_tails_saved", "Partial last blocks saved when their sequence's blocks were reclaimed."),
    "tail_hit_tokens": ("host_tail_hit_tokens", "Of hit_tokens, those from partial last blocks."),
    "restores_chosen": ("host_restores_chosen", "Admissions whose host hit was restored (restore policy)."),
    "recomputes_chosen": ("host_recomputes_chosen",
                          "Admissions whose host hit was recomputed because that was estimated faster, or by "
                          "host_cache_restore_policy=never."),
    "recompute_chosen_tokens": ("host_recompute_chosen_tokens", "Host-hit tokens recomputed by choice."),
    "restore_estimated_saved_seconds": ("host_restore_est_saved_seconds",
                                        "Estimated seconds the restore-or-recompute choices saved over the "
                                        "other choice (lmdeploy_patch/restore_decision.py)."),
    "restore_estimated_lost_seconds": ("host_restore_est_lost_seconds",
                                       "Estimated seconds choices cost over the other choice: restores under "
                                       "host_cache_restore_policy=always, or before the figures were measured."),
    "copy_failures": ("host_copy_failures", "Host copies the copy engine refused or reported failed; each was "
                                            "made again by the fallback path (this process's ranks)."),
    "copies_redone": ("host_copies_redone", "Copies made by the fallback path after a failure or a mismatch "
                                            "(this process's ranks)."),
    "restore_mismatches": ("host_restore_mismatches", "Restored blocks whose bytes differed from their host "
                                                      "slot's checksum, copied again (host_cache_verify)."),
    "verify_failures": ("host_verify_failures", "Host hits whose slot failed its checksum: dropped from the host "
                                                "tier and recomputed (host_cache_verify)."),
    "verify_dropped_blocks": ("host_verify_dropped_blocks", "Blocks those checksum failures dropped."),
    "verify_unconfirmed_blocks": ("host_verify_unconfirmed_blocks",
                                  "Host-hit blocks recomputed because their save had not completed when "
                                  "matched (host_cache_verify)."),
    **{f"lost_{cause}_tokens": (f"host_lost_{cause}_tokens",
                                f"Prompt tokens a never-evicting GPU cache would have served, recomputed: {cause} "
                                "(lmdeploy_patch/lost_hits.py).") for cause in CAUSES},
    # The Mooncake Store behind the host pool (host_cache_store; lmdeploy_patch/store_tier.py)
    "store_lookups": ("host_store_lookups", "Matches that continued from the host tier into the store."),
    "store_queried_blocks": ("host_store_queried_blocks", "Blocks looked up in the store."),
    "store_hit_blocks": ("host_store_hit_blocks", "Blocks fetched from the store into host memory by matches."),
    "store_hit_tokens": ("host_store_hit_tokens", "Prompt tokens of those blocks."),
    "store_read_bytes": ("host_store_bytes_read", "Bytes read from the store (this process's ranks)."),
    "store_written_bytes": ("host_store_bytes_written", "Bytes written to the store (this process's ranks)."),
    "store_blocks_put": ("host_store_blocks_put", "Host blocks put to the store."),
    "store_blocks_present": ("host_store_blocks_present", "Host blocks not put because the store held them."),
    "store_skipped_down": ("host_store_skipped_down", "Blocks neither looked up nor put while the store was "
                                                      "backing off after a failure."),
    "store_puts_unconfirmed": ("host_store_puts_unconfirmed",
                               "Saved blocks not put: their host slot was reused before their save was seen "
                               "complete."),
    **{f"store_failures_{kind}": (f"host_store_failures_{kind}", f"Store calls or blocks that failed: {kind} "
                                                                 "(lmdeploy_patch/store_link.py).")
       for kind in FAILURE_KINDS},
}
GAUGES = {
    "slots_used": ("host_slots_used", "Host-tier blocks held."),
    "slots_capacity": ("host_slots_total", "Host-tier capacity in blocks."),
    "occupancy": ("host_occupancy", "Host-tier blocks held / capacity."),
    "hit_ratio": ("host_hit_rate", "Host-tier hit tokens / queried tokens, since start."),
    "copy_bytes_per_second": ("host_copy_bytes_per_second",
                              "Host-to-GPU restore bandwidth of one rank, measured at start-up (0: not measured "
                              "in this process)."),
    "tier_off": ("host_tier_off", "1 once the host pool became unusable and the tier stopped for the rest of "
                                  "the run."),
    "prefill_tokens_per_second": ("host_prefill_tokens_per_second",
                                  "Prefill throughput learned from this engine's forwards (0: not enough "
                                  "samples yet)."),
    "store_up": ("host_store_up", "1 while every rank's store link is up (0: backing off after a failure, or "
                                  "never connected)."),
}
HISTOGRAMS = {
    "restore_latency_seconds": ("host_restore_latency", "Seconds from a restore's plan to its copy complete, "
                                                        "per rank (this process's ranks)."),
    "restore_size_bytes": ("host_restore_size", "Bytes restored per admission, over all ranks."),
    **{f"store_{name}_latency_seconds": (f"host_store_{name}_latency", f"Seconds per store {name} call, per rank.")
       for name in ("lookup", "fetch", "put")},
}

# Old name (before the conventions) -> new exposition name.
_COUNTER_RENAMES = {"bytes_saved": "saved_bytes", "bytes_restored": "restored_bytes"}
RENAMED = {
    **{PREFIX + old: PREFIX + _COUNTER_RENAMES.get(old, old) + "_total"
       for old in ("hit_tokens", "queried_tokens", "blocks_saved", "blocks_restored", "bytes_saved",
                   "bytes_restored", "evictions", "saves_dropped", "restore_wait_seconds", "tails_saved",
                   "tail_hit_tokens", *(f"lost_{c}_tokens" for c in _CAUSES_BEFORE))},
    PREFIX + "slots_total": PREFIX + "slots_capacity",
    PREFIX + "hit_rate": PREFIX + "hit_ratio",
}


class _Collector:
    """Reports the latest snapshot of each live stat logger (module docstring)."""

    def __init__(self) -> None:
        self.latest: "weakref.WeakKeyDictionary[Any, tuple[list[str], dict, dict]]" = weakref.WeakKeyDictionary()
        self.lock = threading.Lock()

    def update(self, logger: Any, labels: list[str], host: dict) -> None:
        with self.lock:
            _, _, high = self.latest.get(logger, (labels, {}, {}))
            # A counter never goes down: an admission rolled back inside one
            # scheduling pass takes back what it had counted.
            high = {**high, **{key: max(high.get(key, 0), host[key]) for key, _ in COUNTERS.values() if key in host}}
            self.latest[logger] = (labels, host, high)

    def describe(self) -> Iterator[Any]:
        # Nothing to check at registration (names come with the data); the
        # cost: a scrape filtered by name (?name[]=) does not see these.
        return iter(())

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        with self.lock:
            snapshots = list(self.latest.values())
        if not snapshots:
            return
        # (table, family, which part of a snapshot: 1 the figures, 2 the counters' high-water marks)
        for table, kind, part in ((COUNTERS, CounterMetricFamily, 2), (GAUGES, GaugeMetricFamily, 1),
                                  (HISTOGRAMS, HistogramMetricFamily, 1)):
            for name, (key, doc) in table.items():
                family = kind(PREFIX + name, doc, labels=LABELS)
                for snapshot in snapshots:
                    value = snapshot[part].get(key)
                    if value is None:
                        continue
                    if kind is HistogramMetricFamily:
                        family.add_metric(snapshot[0], value["buckets"], value["sum"])
                    else:
                        family.add_metric(snapshot[0], value)
                yield family


_LABELS: "weakref.WeakKeyDictionary[Any, list[str]]" = weakref.WeakKeyDictionary()
_COLLECTOR = _Collector()
_REGISTERED: list[Any] = []  # the registry it is in


def remember_labels(logger: Any, model_name: str, dp_rank: int) -> None:
    """A new stat logger: the labels its figures get. Earlier loggers'
    figures go, as LMDeploy's own collectors do when a logger is made."""
    _LABELS[logger] = [model_name, str(dp_rank)]
    with _COLLECTOR.lock:
        _COLLECTOR.latest.clear()


def record_host_figures(logger: Any, host: dict) -> None:
    """A logger's newest snapshot (HostTier.metrics plus the local ranks')."""
    import prometheus_client

    if not _REGISTERED or _REGISTERED[0] is not prometheus_client.REGISTRY:
        # No `_name`: LMDeploy's PrometheusStatLogger unregisters collectors
        # that have one with "lmdeploy" in it; this one outlives loggers and
        # drops each logger's figures with the logger.
        prometheus_client.REGISTRY.register(_COLLECTOR)
        _REGISTERED[:] = [prometheus_client.REGISTRY]
    _COLLECTOR.update(logger, _LABELS.get(logger, ["", "0"]), host)
