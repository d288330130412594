"""Every Prometheus metric sluice exports, defined once (names per DESIGN.md)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 0.5 ms to 10 s: the range we target, sub-millisecond to seconds.
LATENCY_BUCKETS_S = (
    0.0005,
    0.001,
    0.002,
    0.005,
    0.01,
    0.02,
    0.05,
    0.1,
    0.2,
    0.5,
    1.0,
    2.0,
    5.0,
    10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    """The metric objects, registered in one registry (a fresh one per test)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "sluice_request_latency_seconds",
            "Time from the request's produce timestamp to the end of a stage.",
            ["model", "version", "stage"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "sluice_requests_total",
            "Requests by final outcome.",
            ["model", "version", "outcome"],
            registry=r,
        )
        self.batch_size = Histogram(
            "sluice_batch_size",
            "Requests per model batch.",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "sluice_inference_seconds",
            "Model time per batch.",
            ["model"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.consumer_lag = Gauge(
            "sluice_consumer_lag",
            "Offset lag per consumer group and partition.",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.consumer_time_lag = Gauge(
            "sluice_consumer_time_lag_seconds",
            "Age of the oldest record the group has not consumed yet (0 when it has no lag).",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.consumer_committed_offset = Gauge(
            "sluice_consumer_committed_offset",
            "The group's committed offset (the log start offset where it has committed none).",
            ["group", "topic", "partition"],
            registry=r,
        )
        self.paused_partitions = Gauge(
            "sluice_paused_partitions", "Partitions paused by backpressure.", registry=r
        )
        self.inflight = Gauge(
            "sluice_inflight_requests", "Requests admitted and not yet answered.", registry=r
        )
        self.cache_requests = Counter(
            "sluice_cache_requests_total",
            "Cache lookups by tier and result.",
            ["tier", "result"],
            registry=r,
        )
        self.prefetch = Counter(
            "sluice_prefetch_total", "Prefetch outcomes.", ["result"], registry=r
        )
        self.gpu_utilization = Gauge(
            "sluice_gpu_utilization_ratio", "GPU utilisation (0..1).", ["gpu"], registry=r
        )
        self.gpu_memory_used = Gauge(
            "sluice_gpu_memory_used_bytes", "GPU memory in use.", ["gpu"], registry=r
        )
        self.gpu_memory_total = Gauge(
            "sluice_gpu_memory_total_bytes", "GPU memory in all.", ["gpu"], registry=r
        )
        self.model_load_failures = Counter(
            "sluice_model_load_failures_total",
            "Models that failed to load.",
            ["model"],
            registry=r,
        )
        self.dlq = Counter("sluice_dlq_total", "DLQ records by reason.", ["reason"], registry=r)


class _NoopMetric:
    """Stands in for a metric and for its labelled children: every call does nothing."""

    __slots__ = ()

    def labels(self, *_values: Any, **_labels: Any) -> _NoopMetric:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def dec(self, _amount: float = 1) -> None:
        pass

    def set(self, _value: float) -> None:
        pass

    def observe(self, _value: float) -> None:
        pass

    def remove(self, *_values: Any) -> None:
        pass


_NOOP = _NoopMetric()


class NullMetrics(Metrics):
    """`Metrics` whose every metric is a no-op and whose registry stays empty.

    What a worker records into with ``metrics_enabled=False``, so that the cost of the
    metrics can be measured by switching them off.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        for name in _metric_attributes():
            setattr(self, name, _NOOP)


_ATTRIBUTES: tuple[str, ...] = ()


def _metric_attributes() -> tuple[str, ...]:
    """The names of `Metrics`' metric attributes (from a throwaway instance, once)."""
    global _ATTRIBUTES
    if not _ATTRIBUTES:
        _ATTRIBUTES = tuple(n for n in vars(Metrics(CollectorRegistry())) if n != "registry")
    return _ATTRIBUTES


def make_metrics(enabled: bool = True) -> Metrics:
    """Real metrics in a fresh registry, or `NullMetrics` when ``enabled`` is False."""
    return Metrics() if enabled else NullMetrics()
