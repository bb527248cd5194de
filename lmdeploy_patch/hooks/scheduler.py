"""lmdeploy.pytorch.paging.scheduler.Scheduler: the tier (and the store behind
it) is built with the scheduler (once the trie and the allocator exist), its figures ride on
LMDeploy's ScheduleMetrics (metrics_export.py), and preemptions (a running
sequence that cannot grow goes back to waiting, its blocks kept for now) are
noted for the lost-hit books (lost_hits.py); nothing of LMDeploy's changes."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap

SCHEDULER = "lmdeploy.pytorch.paging.scheduler"


@wrap(SCHEDULER, "Scheduler.__init__", ["self", "scheduler_config", "cache_config"])
def __init__(original: Callable, self: Any, scheduler_config: Any, cache_config: Any, *args: Any,
             **kwargs: Any) -> None:
    from ..scheduler_tier import attach, prepare, tier_of
    from ..store_tier import attach as attach_store

    prepare(cache_config)
    original(self, scheduler_config, cache_config, *args, **kwargs)
    attach(self)
    attach_store(tier_of(self), cache_config)


@wrap(SCHEDULER, "Scheduler.schedule_metrics", ["self"], kind="property")
def schedule_metrics(original: Callable, self: Any) -> Any:
    from ..scheduler_tier import tier_of

    metrics = original(self)
    tier = tier_of(self)
    if tier is not None:
        from ..rank_tier import local_figures

        metrics.host_cache = {**tier.metrics(), **local_figures(id(self.cache_config))}
    return metrics


@wrap(SCHEDULER, "Scheduler.preempt_seqs", ["self", "seqs"])
def preempt_seqs(original: Callable, self: Any, seqs: Any) -> Any:
    from ..scheduler_tier import tier_of

    tier = tier_of(self)
    if tier is None:
        return original(self, seqs)
    from lmdeploy.pytorch.messages import MessageStatus

    seqs = list(seqs)  # an iterable: read it once for the tier, once for LMDeploy
    for seq in seqs:
        # LMDeploy also passes sequences that finished at the last output
        # (the engine loop's running list lags a step): not preemptions.
        if seq.status == MessageStatus.RUNNING:
            tier.on_preempt(seq)
    return original(self, seqs)
