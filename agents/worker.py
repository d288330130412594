"""The faust engine's worker: the faust app for ``fused``, ``naive`` or one stage of
``split``, its agents wired to the library's stages."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import Settings
from pipeline.engines.topology import Mode, Stage, consumed_topics
from pipeline.engines.worker import (
    exit_if_stuck,
    observe,
    per_stage_settings,
    prepare,
    stop_all,
)
from pipeline.models import ModelRegistry
from pipeline.observability.health import Health
from pipeline.observability.metrics import make_metrics
from pipeline.serving import Pipeline

if TYPE_CHECKING:
    from agents.app import SluiceApp

log = logging.getLogger(__name__)


def build(
    settings: Settings, mode: str, stage: str | None = None, health: Health | None = None
) -> tuple[SluiceApp, Any]:
    """The faust app for ``mode`` (and ``stage`` in split mode), with its agents wired, and
    ``health`` (if given) kept up to date."""
    # faust is imported here, not at the top: the batch engine runs without it.
    from agents import gateway, infer, naive, respond, tables
    from agents.app import create_app, faust_sink
    from agents.infer import InferStage

    if mode != Mode.NAIVE:
        Stage.of(mode, stage)  # a split stage must be named
    torch.set_num_threads(settings.torch_threads)
    registry = ModelRegistry(settings.models_path, max_batch_size=settings.max_batch_size)
    if not registry.names:
        raise SystemExit(f"no models in {settings.models_path}; run `sluice model init-demo`")
    metrics = make_metrics(settings.metrics_enabled)
    app = create_app(settings, stage if mode == "split" and stage else mode)
    stage_settings = (
        per_stage_settings(settings, Stage.of(mode, stage)) if mode == Mode.SPLIT else settings
    )
    pipeline = Pipeline(stage_settings, registry, faust_sink(app), metrics)
    if mode == "fused" or stage == "gateway":
        tables.register(app, pipeline)  # the feature tables follow the partitions
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

    if health is not None:
        report_health(app, health)
    return app, metrics


def report_health(app: SluiceApp, health: Health) -> None:
    """Feed the probes: the models are loaded by now (`build`), the assignment comes from
    the app's rebalance signals, and a timer on the event loop is its heartbeat."""
    health.models_ready = True

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _assigned(app: Any, assigned: Any, **kwargs: Any) -> None:
        health.assigned(len(assigned))
        health.beat()  # the event loop is running: the timer's first beat is a second away

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _revoked(app: Any, revoked: Any, **kwargs: Any) -> None:
        health.revoked()

    @app.timer(interval=1.0, name="sluice.heartbeat")
    async def _beat() -> None:
        health.beat()


def run(settings: Settings, mode: str, stage: str | None = None) -> None:
    """Run the faust engine (or the naive baseline) for ``mode`` until it is stopped."""
    import faust

    class Worker(faust.Worker):  # type: ignore[misc]
        def _schedule_shutdown(self, signal: Any) -> None:
            # faust's shutdown waits for the broker without end when it is unreachable
            # (aiokafka's consumer thread): bound it (`exit_if_stuck`).
            health.stop()
            exit_if_stuck(settings.shutdown_timeout_s, signal.name)
            super()._schedule_shutdown(signal)

    registry = prepare(settings)
    health = Health(settings.stall_timeout_s)
    app, metrics = build(settings, mode, stage, health)
    which = Stage.of(mode, stage) if mode != Mode.NAIVE else Stage.FUSED
    observers = observe(
        settings, metrics, app.conf.id, consumed_topics(settings, which, registry.names), health
    )
    worker = Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        stop_all(observers)
