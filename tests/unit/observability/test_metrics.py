"""Metric definitions, and the no-op `NullMetrics` that ``metrics_enabled=False`` selects."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest

from pipeline.config import Settings
from pipeline.models import ModelRegistry
from pipeline.observability.metrics import Metrics, NullMetrics, make_metrics
from pipeline.serving import Pipeline
from tests.unit.serving.test_stages import Env, FakeSink, decode, fused, origin, request, run


def metric_attributes(metrics: Metrics) -> set[str]:
    return {name for name in vars(metrics) if name != "registry"}


def test_lag_and_gpu_metrics_are_defined() -> None:
    registry = CollectorRegistry()
    Metrics(registry)
    names = {f.name for f in registry.collect()}
    assert all(name.startswith("sluice_") for name in names)
    assert {
        "sluice_consumer_lag",
        "sluice_consumer_time_lag_seconds",
        "sluice_consumer_committed_offset",
        "sluice_gpu_utilization_ratio",
        "sluice_gpu_memory_used_bytes",
        "sluice_gpu_memory_total_bytes",
    } <= names


def test_null_metrics_has_every_metric_and_records_nothing() -> None:
    null = NullMetrics()
    assert metric_attributes(null) == metric_attributes(Metrics())
    null.requests.labels("demo", "1", "ok", "").inc()
    null.request_latency.labels(model="demo", version="1", stage="respond", variant="").observe(0.1)
    null.inflight.inc()
    null.inflight.dec(3)
    null.consumer_lag.labels("g", "t", "0").set(5)
    null.consumer_lag.remove("g", "t", "0")
    assert list(null.registry.collect()) == []
    assert generate_latest(null.registry) == b""


def test_make_metrics() -> None:
    assert type(make_metrics(True)) is Metrics
    assert isinstance(make_metrics(False), NullMetrics)
    assert make_metrics(True).registry is not make_metrics(True).registry


def test_pipeline_serves_with_null_metrics(demo_dir: Path, tmp_path: Path) -> None:
    settings = Settings(cache_dir=tmp_path, model_dir=demo_dir, topic_prefix="t")
    registry = ModelRegistry(settings.models_path, device=torch.device("cpu"))
    sink, metrics = FakeSink(), NullMetrics()
    env = Env(settings, registry, sink, metrics, Pipeline(settings, registry, sink, metrics))
    run(lambda: fused(env, [origin(request("a", seed=1)), origin(b"nonsense", offset=1)]))
    assert [decode(s).status for s in env.responses()] == ["ok"]
    assert len(env.dlq()) == 1
    assert generate_latest(metrics.registry) == b""


def test_batch_histogram_matches_prometheus_histogram_semantics() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from pipeline.observability.metrics import LATENCY_BUCKETS_S, BatchHistogram

    values = [0.0005, 0.0006, 0.02, 0.3, 20.0]
    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = BatchHistogram("h_seconds", "h", ("m",), LATENCY_BUCKETS_S, ours_registry)
    theirs = Histogram("h_seconds", "h", ["m"], buckets=LATENCY_BUCKETS_S, registry=theirs_registry)
    ours.labels("a").observe_many(np.array(values[:3]))
    ours.labels("a").observe(values[3])
    ours.labels("a").observe_many(np.array(values[4:]))
    for v in values:
        theirs.labels("a").observe(v)
    for le in [*(repr(float(b)) for b in LATENCY_BUCKETS_S), "+Inf"]:
        labels = {"m": "a", "le": le}
        assert ours_registry.get_sample_value("h_seconds_bucket", labels) == (
            theirs_registry.get_sample_value("h_seconds_bucket", labels)
        ), le
    for suffix in ("_count", "_sum"):
        assert ours_registry.get_sample_value("h_seconds" + suffix, {"m": "a"}) == pytest.approx(
            theirs_registry.get_sample_value("h_seconds" + suffix, {"m": "a"})
        )
