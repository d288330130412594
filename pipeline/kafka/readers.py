"""Reading: a batch of records returned on the first one, whole-topic readers, and high
watermarks read while a new topic's leader settles."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, TopicPartition

from pipeline.config import Settings
from pipeline.kafka.config import consumer_config

log = logging.getLogger(__name__)


def topic_reader(settings: Settings, topic: str, group_id: str, isolation_level: str) -> Any:
    """A consumer that reads every partition of ``topic`` from its beginning, assigned (not
    subscribed: it joins no group and commits nothing), as readers of a whole topic need."""
    consumer = Consumer(
        consumer_config(
            settings,
            group_id,
            **{"enable.auto.commit": False, "isolation.level": isolation_level},
        )
    )
    metadata = consumer.list_topics(topic, timeout=15).topics[topic]
    if metadata.error is not None or not metadata.partitions:
        consumer.close()
        raise RuntimeError(f"no topic {topic!r}: {metadata.error}")
    consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions])
    return consumer


def consume_batch(consumer: Any, max_messages: int, timeout_s: float) -> list[Any]:
    """Up to ``max_messages`` records, returning as soon as one is there.

    confluent-kafka's ``consume(n, timeout)`` waits for n records or the full timeout, which
    adds the whole timeout to latency at low rates; ``poll`` returns on the first record.
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)]


def high_watermark(consumer: Any, topic: str, partition: int, timeout_s: float = 30.0) -> int:
    """A partition's high watermark, retrying while a new topic's leader settles."""
    from confluent_kafka import TopicPartition

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(
                consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=5)[1]
            )
        except KafkaException as exc:
            if not exc.args[0].retriable() and exc.args[0].name() not in _SETTLING:
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


_SETTLING = {"NOT_LEADER_FOR_PARTITION", "LEADER_NOT_AVAILABLE", "UNKNOWN_TOPIC_OR_PART"}
