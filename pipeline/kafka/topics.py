"""Topics: the pipeline's topic set, created (idempotent, waiting for leaders) and deleted."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.config import Settings
from pipeline.kafka.config import confluent_config

log = logging.getLogger(__name__)


def new_topic(settings: Settings, metadata: Any, name: str, partitions: int, **config: str) -> Any:
    """A topic to create: replicated ``replication_factor`` times, or min(3, brokers) when it
    is 0; with three replicas or more, a write needs two (``min.insync.replicas=2``)."""
    replicas = settings.replication_factor or min(3, max(1, len(metadata.brokers)))
    config.setdefault("min.insync.replicas", "2" if replicas >= 3 else "1")
    return NewTopic(name, num_partitions=partitions, replication_factor=replicas, config=config)


def ensure_topics(settings: Settings, topics: list[str], partitions: int | None = None) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    admin = AdminClient(confluent_config(settings))
    metadata = admin.list_topics(timeout=15)
    existing = set(metadata.topics)
    wanted = [
        new_topic(settings, metadata, t, partitions or settings.partitions)
        for t in topics
        if t not in existing
    ]
    if not wanted:
        return
    for topic, future in admin.create_topics(wanted, operation_timeout=15).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise RuntimeError(f"could not create topic {topic}: {exc}") from exc
    _wait_for_leaders(admin, [t.topic for t in wanted])


def grow_partitions(settings: Settings, topics: list[str], partitions: int) -> list[str]:
    """Give each existing topic at least ``partitions`` partitions (Kafka only adds them);
    returns the topics grown. Keys already produced keep their old partitions."""
    from confluent_kafka.admin import NewPartitions

    admin = AdminClient(confluent_config(settings))
    metadata = admin.list_topics(timeout=15).topics
    short = [t for t in topics if t in metadata and len(metadata[t].partitions) < partitions]
    if not short:
        return []
    for topic, future in admin.create_partitions(
        [NewPartitions(t, partitions) for t in short], operation_timeout=15
    ).items():
        future.result()
        log.warning("topic %s grown to %d partitions", topic, partitions)
    _wait_for_leaders(admin, short)
    return short


def delete_topics(settings: Settings, topics: list[str], timeout_s: float = 15.0) -> None:
    """Delete ``topics`` where they exist (best effort: a failure is logged, not raised)."""
    admin = AdminClient(confluent_config(settings))
    existing = set(admin.list_topics(timeout=timeout_s).topics)
    doomed = [t for t in topics if t in existing]
    if not doomed:
        return
    for topic, future in admin.delete_topics(doomed, operation_timeout=timeout_s).items():
        try:
            future.result()
        except KafkaException as exc:
            log.warning("could not delete topic %s: %s", topic, exc)


def _wait_for_leaders(admin: AdminClient, topics: list[str], timeout_s: float = 30.0) -> None:
    """Block until every partition of ``topics`` has a leader (creation is asynchronous)."""
    deadline = time.monotonic() + timeout_s
    while True:
        metadata = admin.list_topics(timeout=10).topics
        ready = all(
            t in metadata
            and metadata[t].error is None
            and metadata[t].partitions
            and all(p.leader >= 0 for p in metadata[t].partitions.values())
            for t in topics
        )
        if ready:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"topics {topics} have no leaders after {timeout_s}s")
        time.sleep(0.1)


def pipeline_topics(settings: Settings, models: list[str]) -> list[str]:
    """Every topic the pipeline reads or writes, for these models."""
    return [
        settings.requests_topic,
        settings.priority_topic,
        settings.results_topic,
        settings.responses_topic,
        settings.dlq_topic,
        settings.shadow_topic,
        settings.experiment_events_topic,
        *(settings.infer_topic(m) for m in models),
    ]
