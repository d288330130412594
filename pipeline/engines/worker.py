"""One worker process: its topics created, its metrics served, its engine run until
SIGTERM/SIGINT. The batch engine runs here; the faust engine (and the naive baseline) in
``agents/``, which the command line picks (`pipeline.cli`)."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from typing import Protocol

import torch

from pipeline.config import Settings
from pipeline.engines.topology import Mode, Stage
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import ModelRegistry
from pipeline.observability.metrics import Metrics, make_metrics
from pipeline.serving import Pipeline

log = logging.getLogger(__name__)


def prepare(settings: Settings) -> ModelRegistry:
    """The worker's models (loaded lazily), with the pipeline's topics created."""
    registry = ModelRegistry(settings.models_path, max_batch_size=settings.max_batch_size)
    ensure_topics(settings, pipeline_topics(settings, registry.names))
    return registry


def run(settings: Settings, stage: Stage) -> None:
    """Run the batch engine for ``stage`` until it is stopped."""
    from pipeline.engines.batch import BatchEngine, install_signal_handlers

    registry = prepare(settings)
    torch.set_num_threads(settings.torch_threads)
    # Models load on their first request, or all at start with SLUICE_PRELOAD_MODELS.
    metrics = make_metrics(settings.metrics_enabled)
    pipeline = Pipeline(per_stage_settings(settings, stage), registry, None, metrics)
    engine = BatchEngine(settings, stage, pipeline)
    install_signal_handlers(engine)
    observers = observe(settings, metrics, settings.group_id(engine.stage), engine.topics())
    # Everything alive now (torch, the models) lives as long as the process: keep it out of
    # the garbage collector's full passes, which otherwise show up as tail latency.
    gc.collect()
    gc.freeze()
    try:
        engine.run()
    finally:
        for observer in observers:
            observer.stop()
        pipeline.close()


class Stoppable(Protocol):
    def stop(self) -> None: ...


def observe(
    settings: Settings, metrics: Metrics, group: str, topics: Sequence[str]
) -> list[Stoppable]:
    """Serve ``/metrics``, ``/dashboard`` and ``/api/summary`` and sample lag and GPUs.

    Only with metrics enabled and a ``metrics_port``; returns what to stop at exit.
    """
    from pipeline.observability.gpu import GpuSampler
    from pipeline.observability.lag_monitor import LagMonitor
    from pipeline.observability.web import MetricsServer

    if not settings.metrics_port:
        return []
    if not settings.metrics_enabled:
        log.warning("metrics disabled (SLUICE_METRICS_ENABLED=false): not serving them")
        return []
    server = MetricsServer(metrics.registry, settings.metrics_host, settings.metrics_port).start()
    return [
        server,
        LagMonitor(settings, metrics, [group], topics).start(),
        GpuSampler(metrics, settings.gpu_interval_s).start(),
    ]


def per_stage_settings(settings: Settings, stage: Stage) -> Settings:
    """Split-mode stages on one host share a worker slot: give each its own RocksDB stores
    (RocksDB locks a store to one process)."""
    if stage == Stage.FUSED:
        return settings
    path = settings.l2_tables_path
    return settings.replace(feature_l2_path=path.with_name(f"{path.name}-{stage}"))


__all__ = ["Mode", "Stage", "observe", "per_stage_settings", "prepare", "run"]
