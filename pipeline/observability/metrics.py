"""Every Prometheus metric sluice exports, defined once (names per DESIGN.md)."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily

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
        self.request_latency = BatchHistogram(
            "sluice_request_latency_seconds",
            "Time from the request's produce timestamp to the end of a stage.",
            ("model", "version", "stage", "variant"),
            LATENCY_BUCKETS_S,
            r,
        )
        self.requests = Counter(
            "sluice_requests_total",
            'Requests by final outcome (variant: the experiment\'s, "" outside one).',
            ["model", "version", "outcome", "variant"],
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
            "sluice_prefetch_total",
            "Prefetched keys by fate: used by a request (precision), or wasted.",
            ["result"],
            registry=r,
        )
        self.prefetch_coverage = Counter(
            "sluice_prefetch_coverage_total",
            "Keyed requests whose data a prefetch had brought (covered) or not (uncovered).",
            ["result"],
            registry=r,
        )
        self.prefetch_skipped = Counter(
            "sluice_prefetch_skipped_total",
            "Predicted keys not prefetched: queue_full, cached, absent, error.",
            ["reason"],
            registry=r,
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
        self.experiment_rollbacks = Counter(
            "sluice_experiment_rollbacks_total",
            "Canary variants set to weight 0 by the rollback guard.",
            ["model", "variant"],
            registry=r,
        )
        self.experiment_config_errors = Counter(
            "sluice_experiment_config_errors_total",
            "Experiment configs refused (the one in force stays).",
            ["model"],
            registry=r,
        )


class BatchHistogram:
    """A Prometheus histogram that also takes a whole batch of observations at once.

    prometheus_client's `Histogram.observe` takes a lock and searches the buckets in Python
    for every value: about a microsecond a request. Here a batch costs one numpy bucket
    search; the series exported are the same (``_bucket``, ``_count``, ``_sum``).
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...],
        registry: CollectorRegistry,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._children: dict[tuple[str, ...], _BatchHistogramChild] = {}
        self._lock = threading.Lock()
        registry.register(self)  # type: ignore[arg-type]

    def labels(self, *values: str) -> _BatchHistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            with self._lock:
                child = self._children.setdefault(values, _BatchHistogramChild(self.bounds))
        return child

    def describe(self) -> list[Any]:
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> list[Any]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            counts, total = child.snapshot()
            cumulative = np.cumsum(counts)
            buckets = [(_bound(b), float(c)) for b, c in zip(self.bounds, cumulative, strict=False)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric(list(values), buckets, total)
        return [family]


class _BatchHistogramChild:
    __slots__ = ("bounds", "counts", "total", "lock")

    def __init__(self, bounds: np.ndarray) -> None:
        self.bounds = bounds
        self.counts = np.zeros(len(bounds) + 1, dtype=np.int64)
        self.total = 0.0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        self.observe_many(np.asarray([value], dtype=np.float64))

    def observe_many(self, values: np.ndarray) -> None:
        # side="left": a value equal to a bound falls in that bound's bucket (le semantics).
        # (The arrays' own methods and the ufuncs: numpy's module functions add a Python
        # call each, which a small batch feels.)
        index = self.bounds.searchsorted(values, "left")
        binned = np.bincount(index, minlength=len(self.counts))
        with self.lock:
            np.add(self.counts, binned, out=self.counts)
            self.total += float(np.add.reduce(values))

    def snapshot(self) -> tuple[np.ndarray, float]:
        with self.lock:
            return self.counts.copy(), self.total


def _bound(b: float) -> str:
    return repr(float(b))


class _NoopMetric:
    """Stands in for a metric and for its labelled children: every call does nothing."""

    __slots__ = ()

    def labels(self, *_values: Any, **_labels: Any) -> _NoopMetric:
        return self

    def inc(self, _amount: float = 1) -> None:
        pass

    def observe_many(self, _values: Any) -> None:
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
