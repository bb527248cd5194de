"""lmdeploy.metrics.stats.SchedulerStats: the host figures of a
ScheduleMetrics (hooks/scheduler.py) are kept for the stat loggers."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap


@wrap("lmdeploy.metrics.stats", "SchedulerStats.update_from_schedule_metrics", ["self", "scheduled_metrics"])
def update_from_schedule_metrics(original: Callable, self: Any, scheduled_metrics: Any) -> Any:
    result = original(self, scheduled_metrics)
    host = getattr(scheduled_metrics, "host_cache", None)
    if host is not None:
        self.host_cache = host
    return result
