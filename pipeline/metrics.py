"""Every Prometheus metric sluice exports, defined once (names per DESIGN.md)."""

from __future__ import annotations

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
