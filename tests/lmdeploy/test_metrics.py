"""Host-tier figures through LMDeploy's metrics path to /metrics."""
from __future__ import annotations

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
pytest.importorskip("lmdeploy")

from lmdeploy.metrics.loggers import PrometheusStatLogger  # noqa: E402
from lmdeploy.metrics.stats import SchedulerStats  # noqa: E402
from test_scheduler_tier import chat_workload  # noqa: E402
from benchmark.sim_engine import SimEngine  # noqa: E402


def _exported() -> dict:
    """{name as exposed, with its labels for histogram series: value}."""
    text = prometheus_client.generate_latest().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("lmdeploy:host_cache_"):
            name, value = line.rsplit(" ", 1)
            base = name.split("{")[0]
            if "_bucket" in base:
                base += "{" + name.split("le=")[1].split(",")[0].split("}")[0] + "}"
            out[base] = float(value)
    return out


def _types() -> dict:
    text = prometheus_client.generate_latest().decode()
    return {line.split()[2]: line.split()[3] for line in text.splitlines()
            if line.startswith("# TYPE lmdeploy:host_cache_")}


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
    assert exported["lmdeploy:host_cache_hit_tokens_total"] == host["host_hit_tokens"]
    assert exported["lmdeploy:host_cache_blocks_restored_total"] == host["host_blocks_restored"]
    assert exported["lmdeploy:host_cache_restored_bytes_total"] == host["host_bytes_restored"] > 0
    assert exported["lmdeploy:host_cache_occupancy"] == pytest.approx(host["host_occupancy"])
    assert exported["lmdeploy:host_cache_slots_capacity"] == 64
    # One observation per admission that restored: sizes are whole blocks.
    size = host["host_restore_size"]
    assert exported["lmdeploy:host_cache_restore_size_bytes_count"] == size["count"] > 0
    assert exported["lmdeploy:host_cache_restore_size_bytes_sum"] % eng.block_bytes == 0
    assert exported["lmdeploy:host_cache_restore_size_bytes_bucket{\"+Inf\"}"] == size["count"]
    latency = exported["lmdeploy:host_cache_restore_latency_seconds_count"]
    assert latency == host["host_restore_latency"]["count"] > 0  # the rank lives in this process
    eng.end_all()


def test_prometheus_types_and_names():
    """Counters end in _total, gauges do not, histograms have buckets; every
    old name is listed with its new one in the README's changelog."""
    import os

    from lmdeploy_patch.metrics_export import COUNTERS, GAUGES, HISTOGRAMS, RENAMED

    eng = SimEngine(num_gpu_blocks=24, host_slots=64)
    chat_workload(eng)
    stats = SchedulerStats()
    stats.update_from_schedule_metrics(eng.scheduler.schedule_metrics)
    logger = PrometheusStatLogger("m", 4096, 0)
    logger.record_schedule(stats)
    types = _types()
    exported = _exported()
    for name in COUNTERS:
        assert types["lmdeploy:host_cache_" + name + "_total"] == "counter"
        if not name.startswith("store_"):  # exported with a store only: test_store_figures_are_exported
            assert "lmdeploy:host_cache_" + name + "_total" in exported
    for name in GAUGES:
        assert types["lmdeploy:host_cache_" + name] == "gauge" and not name.endswith("_total")
    for name in HISTOGRAMS:
        assert types["lmdeploy:host_cache_" + name] == "histogram"
    readme = open(os.path.join(os.path.dirname(__file__), "..", "..", "README.md")).read()
    for old, new in RENAMED.items():
        assert f"`{old}` → `{new}`" in readme, (old, new)
    assert readme.count("` → `lmdeploy:host_cache_") == len(RENAMED), "the changelog lists a rename RENAMED lacks"
    for name in [*COUNTERS, *GAUGES, *HISTOGRAMS]:
        shown = "lmdeploy:host_cache_" + name + ("_total" if name in COUNTERS else "")
        assert f"`{shown}`" in readme, f"{shown} is not documented in the README"
    eng.end_all()


def test_store_figures_are_exported():
    """Every figure a store tier reports (before any link connected) has its
    name in the exporter's tables, and each table entry of the store is reported."""
    from lmdeploy_patch.metrics_export import _COLLECTOR, COUNTERS, GAUGES, HISTOGRAMS, record_host_figures, \
        remember_labels
    from lmdeploy_patch.store_tier import StoreTier

    figures = StoreTier(config_id=-1, namespace="ns", num_slots=4, block_size=64, budget_s=0.1,
                        bytes_per_block=1).metrics()
    keys = {key for table in (COUNTERS, GAUGES, HISTOGRAMS) for key, _ in table.values()}
    assert set(figures) <= keys, set(figures) - keys
    store_keys = {key for table in (COUNTERS, GAUGES, HISTOGRAMS) for key, _ in table.values()
                  if key.startswith("host_store_")}
    assert store_keys == set(figures), store_keys ^ set(figures)

    class Logger:
        pass

    logger = Logger()
    remember_labels(logger, "m", 0)
    record_host_figures(logger, figures)
    exported = _exported()
    for name in COUNTERS:
        if name.startswith("store_"):
            assert exported["lmdeploy:host_cache_" + name + "_total"] == 0
    assert exported["lmdeploy:host_cache_store_up"] == 0  # no link: never connected
    assert exported["lmdeploy:host_cache_store_fetch_latency_seconds_count"] == 0
    with _COLLECTOR.lock:
        _COLLECTOR.latest.clear()


def test_counters_never_go_down():
    """A rolled-back admission takes back hits it had counted; the exported
    counter keeps its high-water mark (a decrease reads as a reset)."""
    from lmdeploy_patch.metrics_export import _COLLECTOR, record_host_figures, remember_labels

    class Logger:
        pass

    logger = Logger()
    remember_labels(logger, "m", 0)
    record_host_figures(logger, {"host_hit_tokens": 128, "host_slots_used": 5})
    record_host_figures(logger, {"host_hit_tokens": 64, "host_slots_used": 3})
    exported = _exported()
    assert exported["lmdeploy:host_cache_hit_tokens_total"] == 128
    assert exported["lmdeploy:host_cache_slots_used"] == 3  # a gauge follows the value
    record_host_figures(logger, {"host_hit_tokens": 192})
    assert _exported()["lmdeploy:host_cache_hit_tokens_total"] == 192
    with _COLLECTOR.lock:
        _COLLECTOR.latest.clear()


def test_tier_off_exports_nothing_new():
    eng = SimEngine(num_gpu_blocks=24)
    chat_workload(eng, rounds=1)
    metrics = eng.scheduler.schedule_metrics
    assert not hasattr(metrics, "host_cache")
    stats = SchedulerStats()
    stats.update_from_schedule_metrics(metrics)
    PrometheusStatLogger("m", 4096, 0).record_schedule(stats)  # re-registers lmdeploy's collectors only
    assert _exported() == {}
