"""lmdeploy.metrics.loggers.PrometheusStatLogger: the host figures become
lmdeploy:host_cache_* counters, gauges and histograms on /metrics (metrics_export.py)."""
from __future__ import annotations

from typing import Any, Callable

from ..hook import wrap

LOGGERS = "lmdeploy.metrics.loggers"


@wrap(LOGGERS, "PrometheusStatLogger.__init__", ["self", "model_name", "max_model_len", "dp_rank"])
def __init__(original: Callable, self: Any, model_name: str, max_model_len: int, dp_rank: int = 0) -> None:
    original(self, model_name, max_model_len, dp_rank)
    from ..metrics_export import remember_labels

    remember_labels(self, model_name, dp_rank)


@wrap(LOGGERS, "PrometheusStatLogger.record_schedule", ["self", "stats"])
def record_schedule(original: Callable, self: Any, stats: Any) -> Any:
    result = original(self, stats)
    host = getattr(stats, "host_cache", None)
    if host is not None:
        from ..metrics_export import record_host_figures

        record_host_figures(self, host)
    return result
