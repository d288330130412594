"""One worker process: its topics created, its metrics and probes served, its engine run
until SIGTERM/SIGINT, and its shutdown bounded. The batch engine runs here; the faust engine
(and the naive baseline) in ``agents/``, which the command line picks (`pipeline.cli`)."""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from pipeline.config import Settings
from pipeline.engines.topology import Mode, Stage, consumed_topics
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import ModelRegistry
from pipeline.observability.health import Health
from pipeline.observability.metrics import Metrics, make_metrics
from pipeline.serving import Pipeline

log = logging.getLogger(__name__)

# The exit status of a worker whose shutdown outlived `Settings.shutdown_timeout_s`.
EXIT_STUCK = 75

# The garbage collector's thresholds while the engine runs. CPython's (700, 10, 10) collect
# the youngest objects each time 700 more containers are alive than at the last pass: about
# once per consumed batch here, about 2 µs of CPU per request in the fused worker. Its requests'
# objects are freed by their reference counts, so at 50,000 no pass comes once the worker
# runs (measured: benchmarks/README.md, "The garbage collector").
GC_THRESHOLDS = (50_000, 20, 100)


def settle_collector() -> None:
    """Everything alive now (torch, the models) lives as long as the process: keep it out of
    the garbage collector's full passes, which otherwise show up as tail latency, and collect
    at `GC_THRESHOLDS` from here on."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def prepare(settings: Settings) -> ModelRegistry:
    """The worker's models (loaded lazily), with the pipeline's topics created."""
    registry = ModelRegistry(settings.models_path, max_batch_size=settings.max_batch_size)
    ensure_topics(settings, pipeline_topics(settings, registry.names))
    return registry


def run(settings: Settings, stage: Stage) -> None:
    """Run the batch engine for ``stage`` until it is stopped."""
    from pipeline.engines.batch import BatchEngine

    registry = prepare(settings)
    torch.set_num_threads(settings.torch_threads)
    metrics = make_metrics(settings.metrics_enabled)
    health = Health(settings.stall_timeout_s)
    # Served from here on: the probes say "not ready" while the models load.
    topics = consumed_topics(settings, stage, registry.names)
    observers = observe(settings, metrics, settings.group_id(stage), topics, health)
    # Models load on their first request, or all at start with SLUICE_PRELOAD_MODELS.
    pipeline = Pipeline(per_stage_settings(settings, stage), registry, None, metrics)
    try:
        engine = BatchEngine(settings, stage, pipeline, health)
    except BaseException:
        stop_all(observers)
        raise
    on_stop_signal(settings, health, engine.stop)
    if settings.exit_on_stall:
        exit_if_stalled(health)
    settle_collector()
    try:
        engine.run()
    finally:
        stop_all(observers)
        pipeline.close()


def on_stop_signal(settings: Settings, health: Health, stop: Callable[[], None]) -> None:
    """On SIGTERM/SIGINT: report not ready, ask the engine to ``stop``, and bound it."""

    def handle(signum: int, _frame: object) -> None:
        health.stop()
        stop()
        exit_if_stuck(settings.shutdown_timeout_s, signal.Signals(signum).name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handle)


_watchdog: threading.Timer | None = None


def exit_if_stuck(timeout_s: float, why: str) -> None:
    """End the process if it is still running ``timeout_s`` from now (once per process).

    A worker asked to stop drains and commits, which needs the broker. When the broker is
    unreachable, a client library may wait for it without end (the faust engine's aiokafka
    consumer thread does); nothing is lost by exiting then, since what was not committed is
    consumed again by the partitions' next owner.
    """
    global _watchdog
    if _watchdog is not None:
        return

    def expire() -> None:
        log.error(
            "still stopping %.0f s after %s: exiting (what was not committed is consumed "
            "again by the partitions' next owner)",
            timeout_s,
            why,
        )
        logging.shutdown()
        os._exit(EXIT_STUCK)

    _watchdog = threading.Timer(timeout_s, expire)
    _watchdog.daemon = True
    _watchdog.name = "sluice-shutdown-watchdog"
    _watchdog.start()


def exit_if_stalled(health: Health, check_s: float = 1.0) -> threading.Thread:
    """End the process (status 75) once the engine's loop has not gone round for
    ``health.stall_s``: what a liveness probe does under Kubernetes, for supervisors that only
    restart a process. The main thread's stack goes to stderr first, to say where it stood.

    A loop can stop in a client library's call that never returns: librdkafka's
    ``send_offsets_to_transaction`` waits without end for a group coordinator that left the
    cluster's metadata (confluentinc/librdkafka#5511, fixed after v2.16). Nothing is lost by
    exiting: under exactly-once the open transaction aborts, and what was not committed is
    consumed again.
    """

    def watch() -> None:
        while True:
            time.sleep(check_s)
            live, body = health.live()
            if live or health.stopping or body.get("reason") == "starting":
                continue
            log.error("%s: exiting so that the worker is started again", body["reason"])
            faulthandler.dump_traceback(all_threads=True)
            logging.shutdown()
            os._exit(EXIT_STUCK)

    thread = threading.Thread(target=watch, name="sluice-stall-watchdog", daemon=True)
    thread.start()
    return thread


class Stoppable(Protocol):
    def stop(self) -> None: ...


def stop_all(observers: Sequence[Stoppable]) -> None:
    for observer in observers:
        observer.stop()


def observe(
    settings: Settings,
    metrics: Metrics,
    group: str,
    topics: Sequence[str],
    health: Health | None = None,
) -> list[Stoppable]:
    """Serve ``/metrics``, ``/dashboard``, ``/api/summary`` and the probes (given ``health``),
    and sample lag and GPUs.

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
    server = MetricsServer(
        metrics.registry, settings.metrics_host, settings.metrics_port, health
    ).start()
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


__all__ = [
    "EXIT_STUCK",
    "Mode",
    "Stage",
    "exit_if_stuck",
    "observe",
    "on_stop_signal",
    "per_stage_settings",
    "prepare",
    "run",
    "stop_all",
]
