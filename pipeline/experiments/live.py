"""Experiments in a running worker: the configs in force (reloaded while it runs), each
request's variant, the rollback guard, and the events topic that carries rollbacks to every
worker of the pipeline.

The serving layer asks three things (`pipeline.serving.admission`, `.responses`):
`route` (which version serves a request, as which variant, and whether it is mirrored),
`record` (how a variant's request ended), and `tick` (once per consumed batch: reload the
configs, apply the rollbacks other workers decided, and let the guard decide).

A rollback is decided by one worker from what it served, applied there at once, and
published on ``<prefix>.experiments``, keyed by model. Every worker reads that topic from
the beginning, so a worker that starts later, or restarts, applies it too, as long as the
config it was decided for (its fingerprint) is still the one in force: an edited config is
the operator deciding again.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.experiments.config import Experiment, Experiments, Shadow
from pipeline.experiments.guard import Rollback, RollbackGuard
from pipeline.experiments.routing import choose, mirrored, routing_key
from pipeline.observability.metrics import Metrics

log = logging.getLogger(__name__)

# The largest event record read back (a rollback is a few hundred bytes).
MAX_EVENT_BYTES = 65_536


@dataclass(frozen=True, slots=True)
class Route:
    """Where an experiment sends one request."""

    version: str
    variant: str
    shadow: Shadow | None  # set when the request is mirrored


class EventLog:
    """The experiments topic: rollbacks published, and read back from the beginning."""

    def __init__(self, settings: Settings) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

        from pipeline.kafka.config import consumer_config, producer_config

        self.topic = settings.experiment_events_topic
        self.producer = Producer(producer_config(settings))
        # No group: every worker reads every event (assign, not subscribe).
        self.consumer = Consumer(
            consumer_config(
                settings, f"{settings.topic_prefix}-experiments-{uuid.uuid4().hex[:8]}",
                **{"enable.auto.commit": False, "isolation.level": "read_committed"},
            )
        )  # fmt: skip
        # Every partition the pipeline creates it with (`pipeline_topics`): no metadata call,
        # so a worker whose broker is away is not held up here.
        self.consumer.assign(
            [TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(settings.partitions)]
        )

    def publish(self, model: str, event: dict[str, Any]) -> None:
        value = json.dumps(event, sort_keys=True, separators=(",", ":")).encode()
        self.producer.produce(self.topic, value, model.encode())
        self.producer.poll(0)  # delivered in the background, flushed at close

    def poll(self) -> list[dict[str, Any]]:
        """The events that arrived since the last call (without waiting)."""
        self.producer.poll(0)
        events = []
        for message in self.consumer.consume(100, 0):
            value = message.value()
            if message.error() is not None or not value or len(value) > MAX_EVENT_BYTES:
                continue
            try:
                event = json.loads(value)
            except ValueError:
                log.warning("unreadable record on %s at offset %s", self.topic, message.offset())
                continue
            if isinstance(event, dict):
                events.append(event)
        return events

    def close(self) -> None:
        self.producer.flush(5.0)
        self.consumer.close()


class LiveExperiments:
    """The experiments of one worker."""

    def __init__(
        self,
        settings: Settings,
        model_dir: Path,
        versions: Callable[[str], list[str]],
        names: Callable[[], list[str]],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        events: Callable[[], Any] | None = None,
    ) -> None:
        self.configs = Experiments(model_dir, versions, names, settings.experiment_reload_s, clock)
        self.guard = RollbackGuard()
        self.metrics = metrics
        self.clock = clock
        self.interval_s = settings.experiment_reload_s
        self._make_events = events or (lambda: EventLog(settings))
        self._events: Any = None  # an EventLog, made when the first experiment appears
        self._events_retry_s = 0.0
        self._next_s = 0.0
        self.tick(force=True)

    # -- per request ----------------------------------------------------------------------

    def route(self, model: str, key: str | None, request_id: str) -> Route | None:
        """The variant for a request that names no version, if its model has an experiment."""
        experiment = self.configs.get(model)
        if experiment is None or not experiment.active:
            return None
        k = routing_key(key, request_id)
        variant = choose(experiment, k)
        shadow = experiment.shadow if mirrored(experiment, k) else None
        return Route(variant.version, variant.name, shadow)

    def known(self, model: str, variant: str | None) -> str | None:
        """``variant`` if the model's experiment has it, else None: a name read off a record
        (split mode) becomes a label value only when the config names it."""
        experiment = self.configs.get(model)
        if variant is None or experiment is None:
            return None
        names = {v.name for v in experiment.variants}
        if experiment.shadow is not None:
            names.add(experiment.shadow.name)
        return variant if variant in names else None

    def record(self, model: str, variant: str, latency_s: float, ok: bool) -> None:
        self.guard.record(model, variant, latency_s, ok, self.clock())

    # -- once per batch -------------------------------------------------------------------

    def tick(self, force: bool = False) -> None:
        """Reload the configs, apply others' rollbacks and check the guard: at most once per
        ``experiment_reload_s``."""
        now = self.clock()
        if not force and now < self._next_s:
            return
        self._next_s = now + self.interval_s
        for error in self.configs.maybe_reload(force=force):
            model = error.model if hasattr(error, "model") else ""
            self.metrics.experiment_config_errors.labels(model or "unknown").inc()
        experiments = self.configs.all()
        if not experiments:
            return
        events = self._event_log()
        if events is not None:
            for event in events.poll():
                self._apply(event)
        for experiment in experiments:
            decision = self.guard.check(experiment, now)
            if decision is not None:
                self._roll_back(decision)

    def _event_log(self) -> Any:
        if self._events is None and self.clock() >= self._events_retry_s:
            try:
                self._events = self._make_events()
            except Exception as exc:  # noqa: BLE001 - no cluster yet: try again later
                log.warning("experiments topic unavailable (again in 30 s): %s", exc)
                self._events_retry_s = self.clock() + 30.0
        return self._events

    def _roll_back(self, decision: Rollback) -> None:
        if not self.configs.rollback(decision.model, decision.variant, decision.fingerprint):
            return
        self.metrics.experiment_rollbacks.labels(decision.model, decision.variant).inc()
        log.warning(
            "experiment %s: canary %s rolled back to weight 0: %s",
            decision.model, decision.variant, decision.reason,
        )  # fmt: skip
        events = self._event_log()
        if events is not None:
            try:
                events.publish(decision.model, {"type": "rollback", **decision.to_json()})
            except Exception as exc:  # noqa: BLE001 - applied here; the others decide alone
                log.error("could not publish the rollback of %s: %s", decision.variant, exc)

    def _apply(self, event: dict[str, Any]) -> None:
        if event.get("type") != "rollback":
            return
        model, variant = event.get("model"), event.get("variant")
        fingerprint = event.get("fingerprint")
        if not all(isinstance(v, str) for v in (model, variant, fingerprint)):
            return
        assert isinstance(model, str) and isinstance(variant, str)
        assert isinstance(fingerprint, str)
        if self.configs.rollback(model, variant, fingerprint):
            log.warning("experiment %s: canary %s rolled back (by another worker): %s",
                        model, variant, event.get("reason", ""))  # fmt: skip

    def experiment(self, model: str) -> Experiment | None:
        return self.configs.get(model)

    def close(self) -> None:
        if self._events is not None:
            self._events.close()
            self._events = None
