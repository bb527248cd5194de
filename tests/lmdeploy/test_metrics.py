"""Host-tier figures through LMDeploy's metrics path to /metrics."""
from __future__ import annotations

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("lmdeploy")

from lmdeploy.metrics.loggers import PrometheusStatLogger  # noqa: E402
from lmdeploy.metrics.stats import SchedulerStats  # noqa: E402
from test_scheduler_tier import chat_workload  # noqa: E402
from sim_engine import SimEngine  # noqa: E402


def _exported() -> dict:
    text = prometheus_client.generate_latest().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lmdeploy:host_cache_"):
            name, value = line.rsplit(" ", 1)
            out[name.split("{")[0]] = float(value)
    return out


def test_schedule_metrics_reach_prometheus():
    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    chat_workload(eng)
    metrics = eng.scheduler.schedule_metrics
    host = metrics.host_cache
    assert host["host_hit_tokens"] > 0 and host["host_slots_total"] == 64
    assert metrics.prefix_cache_hit_rate == pytest.approx(eng.hit_rate())
    assert host["host_restore_wait_seconds"] >= 0  # the rank lives in this process
    stats = SchedulerStats()
    stats.update_from_schedule_metrics(metrics)
    logger = PrometheusStatLogger("m", 4096, 0)
    logger.record_schedule(stats)
    exported = _exported()
    assert exported["lmdeploy:host_cache_hit_tokens"] == host["host_hit_tokens"]
    assert exported["lmdeploy:host_cache_blocks_restored"] == host["host_blocks_restored"]
    assert exported["lmdeploy:host_cache_occupancy"] == pytest.approx(host["host_occupancy"])
    assert exported["lmdeploy:host_cache_slots_total"] == 64
    eng.end_all()


def test_tier_off_exports_nothing_new():
    eng = SimEngine(num_gpu_blocks=24)
    chat_workload(eng, rounds=1)
    metrics = eng.scheduler.schedule_metrics
    assert not hasattr(metrics, "host_cache")
    stats = SchedulerStats()
    stats.update_from_schedule_metrics(metrics)
    PrometheusStatLogger("m", 4096, 0).record_schedule(stats)  # re-registers lmdeploy's collectors only
    assert _exported() == {}
