"""The faust engine's worker: the faust app for ``fused``, ``naive`` or one stage of
``split``, its agents wired to the library's stages."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from pipeline.config import Settings
from pipeline.engines.topology import Mode, Stage, consumed_topics
from pipeline.engines.worker import observe, per_stage_settings, prepare
from pipeline.models import ModelRegistry
from pipeline.observability.metrics import make_metrics
from pipeline.serving import Pipeline

if TYPE_CHECKING:
    from agents.app import SluiceApp

log = logging.getLogger(__name__)


def build(settings: Settings, mode: str, stage: str | None = None) -> tuple[SluiceApp, Any]:
    """The faust app for ``mode`` (and ``stage`` in split mode), with its agents wired."""
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

    return app, metrics


def run(settings: Settings, mode: str, stage: str | None = None) -> None:
    """Run the faust engine (or the naive baseline) for ``mode`` until it is stopped."""
    import faust

    registry = prepare(settings)
    app, metrics = build(settings, mode, stage)
    which = Stage.of(mode, stage) if mode != Mode.NAIVE else Stage.FUSED
    observers = observe(
        settings, metrics, app.conf.id, consumed_topics(settings, which, registry.names)
    )
    worker = faust.Worker(app, loglevel=settings.log_level, quiet=True, redirect_stdouts=False)
    try:
        worker.execute_from_commandline()
    finally:
        for observer in observers:
            observer.stop()
