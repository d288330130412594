"""A raw reader of whole topics, for tests that count what really landed on the broker."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import consume_batch, consumer_config


@dataclass(frozen=True, slots=True)
class Read:
    """One record as it sits on the broker."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class TopicReader:
    """Every partition of a topic from its first offset, outside any consumer group.

    Unlike `pipeline.client.Client` it keeps every record, duplicates included, and never
    blocks on a bounded pending map.
    """

    def __init__(
        self, settings: Settings, topic: str, isolation_level: str = "read_uncommitted"
    ) -> None:
        self.topic = topic
        self.records: list[Read] = []
        self._consumer = Consumer(
            consumer_config(
                settings,
                f"{settings.topic_prefix}-reader-{uuid.uuid4().hex[:8]}",
                **{"enable.auto.commit": False, "isolation.level": isolation_level},
            )
        )
        metadata = self._consumer.list_topics(topic, timeout=15).topics[topic]
        assert metadata.error is None and metadata.partitions, f"no topic {topic}"
        self._consumer.assign(
            [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
        )

    def _poll(self, timeout_s: float, on_record: Callable[[Read], None] | None) -> int:
        got = 0
        for m in consume_batch(self._consumer, 1000, timeout_s):
            if m.error() is not None:
                continue
            read = Read(m.partition(), m.offset(), m.key(), m.value())
            self.records.append(read)
            if on_record is not None:
                on_record(read)
            got += 1
        return got

    def read_until(
        self,
        done: Callable[[], bool],
        timeout_s: float,
        on_record: Callable[[Read], None] | None = None,
        idle_s: float = 1.5,
    ) -> bool:
        """Read until ``done()`` holds, then on until nothing new came for ``idle_s``.

        The idle tail catches records that arrive after the expected ones (duplicates, or
        extras that should not be there). Returns whether ``done()`` held in time.
        """
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            self._poll(0.2, on_record)
        ok = done()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s and time.monotonic() < deadline + idle_s:
            if self._poll(0.2, on_record):
                quiet_since = time.monotonic()
        return ok

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
