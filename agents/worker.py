"""Builds and runs one worker process: ``fused``, ``naive``, or one stage of ``split``."""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import torch

from pipeline.config import Settings
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import ModelRegistry
from pipeline.observability.metrics import Metrics, make_metrics
from pipeline.serving import Pipeline

if TYPE_CHECKING:
    from agents.app import SluiceApp

STAGES = ("gateway", "infer", "respond")
log = logging.getLogger(__name__)


def build(settings: Settings, mode: str, stage: str | None = None) -> tuple[SluiceApp, Any]:
    """The faust app for ``mode`` (and ``stage`` in split mode), with its agents wired."""
    # faust is imported here, not at the top: the batch engine runs without it.
    from agents import gateway, infer, naive, prefetch, respond
    from agents.app import create_app, faust_sink
    from agents.infer import InferStage

    if mode == "split" and stage not in STAGES:
        raise ValueError(f"split mode needs a stage in {STAGES}, got {stage!r}")
    torch.set_num_threads(settings.torch_threads)
    registry = ModelRegistry(settings.models_path, max_batch_size=settings.max_batch_size)
    if not registry.names:
        raise SystemExit(f"no models in {settings.models_path}; run `sluice model init-demo`")
    metrics = make_metrics(settings.metrics_enabled)
    app = create_app(settings, stage if mode == "split" and stage else mode)
    pipeline = Pipeline(
        _per_stage_tables(settings, mode, stage), registry, faust_sink(app), metrics
    )
    if mode == "fused" or stage == "gateway":
        prefetch.register(app, pipeline)  # the feature tables follow the partitions
    stage_obj: InferStage | None = None
    if mode == "fused":
        registry.load_all()
        stage_obj = InferStage(pipeline, pipeline.respond)
        gateway.register(app, pipeline, stage_obj)
    elif mode == "naive":
        registry.load_all()
        naive.register(app, pipeline)
    elif stage == "gateway":
        gateway.register(app, pipeline, None)
    elif stage == "infer":
        registry.load_all()
        stage_obj = InferStage(pipeline, pipeline.publish_results)
        infer.register(app, pipeline, stage_obj)
    else:
        respond.register(app, pipeline)

    if stage_obj is not None:
        flushing = stage_obj

        @app.on_partitions_revoked.connect  # type: ignore[arg-type]
        async def _flush_on_revoke(app: Any, revoked: Any, **kwargs: Any) -> None:
            # Answer what is in flight before its partitions move to another worker.
            await flushing.flush(timeout_s=10.0)

    return app, metrics


def run(settings: Settings, mode: str, stage: str | None = None) -> None:
    """Create topics, start the metrics endpoint and run the worker until stopped.

    ``naive`` and ``engine=faust`` run faust agents; otherwise the batch engine runs the same
    stages on confluent-kafka.
    """
    registry = ModelRegistry(settings.models_path, max_batch_size=settings.max_batch_size)
    ensure_topics(settings, pipeline_topics(settings, registry.names))
    if mode != "naive" and settings.engine == "batch":
        _run_batch_engine(settings, mode, stage)
        return
    import faust

    app, metrics = build(settings, mode, stage)
    name = stage if mode == "split" and stage else mode
    observers = observe(
        settings, metrics, settings.group_id(name), consumed_topics(settings, name, registry.names)
    )
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        for observer in observers:
            observer.stop()


def consumed_topics(settings: Settings, stage: str, models: Sequence[str]) -> list[str]:
    """The topics a worker of ``stage`` (or ``fused``/``naive``) consumes."""
    if stage == "infer":
        return [settings.infer_topic(m) for m in models]
    if stage == "respond":
        return [settings.results_topic]
    return [settings.requests_topic]


class _Stoppable(Protocol):
    def stop(self) -> None: ...


def observe(
    settings: Settings, metrics: Metrics, group: str, topics: Sequence[str]
) -> list[_Stoppable]:
    """Serve ``/metrics``, ``/dashboard`` and ``/api/summary`` and sample lag and GPUs.

    Only with metrics enabled and a ``metrics_port``; returns what to stop at exit.
    """
    from pipeline.kafka.lag import LagMonitor
    from pipeline.observability.gpu import GpuSampler
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


def _run_batch_engine(settings: Settings, mode: str, stage: str | None) -> None:
    from pipeline.engines.batch import BatchEngine, install_signal_handlers

    if mode == "split" and stage not in STAGES:
        raise ValueError(f"split mode needs a stage in {STAGES}, got {stage!r}")
    torch.set_num_threads(settings.torch_threads)
    # Models load on their first request, or all at start with SLUICE_PRELOAD_MODELS.
    registry = ModelRegistry(settings.models_path, max_batch_size=settings.max_batch_size)
    metrics = make_metrics(settings.metrics_enabled)
    pipeline = Pipeline(_per_stage_tables(settings, mode, stage), registry, None, metrics)
    engine = BatchEngine(settings, "fused" if mode == "fused" else str(stage), pipeline)
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


def _per_stage_tables(settings: Settings, mode: str, stage: str | None) -> Settings:
    """Split-mode stages on one host share a worker slot: give each its own RocksDB stores
    (RocksDB locks a store to one process)."""
    if mode != "split" or not stage:
        return settings
    path = settings.features_l2_path
    return settings.replace(feature_l2_path=path.with_name(f"{path.name}-{stage}"))
