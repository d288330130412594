"""Re-driving dead-lettered records after a fix: ``sluice dlq replay``."""

from __future__ import annotations

import base64
import time
from collections import Counter
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import (
    RecordRejected,
    consumer_config,
    high_watermark,
    produce,
    producer_config,
)
from pipeline.protocol import codec

REPLAYED_HEADER = "sluice-replayed-from"
TRUNCATED_WHY = (
    "truncated: the DLQ record holds only a prefix of the original (it was too large to "
    "dead-letter whole), so replaying it would send a different request; its size and sha256 "
    "identify the original for whoever still has it"
)
MAX_REFUSED_LISTED = 100


def replay(
    settings: Settings,
    reasons: set[str] | None = None,
    max_records: int | None = None,
    dry_run: bool = False,
    to_topic: str | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Produce the original bytes of DLQ records back to the topic they failed on.

    Reads the DLQ from where the last replay stopped (its own consumer group) to the end as it
    was when the replay started; records whose reason is not in ``reasons`` are passed over.
    Offsets are committed only after the replayed records are delivered, so an interrupted
    replay is resumed, never skipped. ``dry_run`` reads and counts without producing or
    committing.

    A truncated record (its original was too large to carry whole) is refused: replaying its
    prefix would be a different request. ``refused`` lists where each one is, and why.
    """
    unknown = (reasons or set()) - set(codec.REASONS)
    if unknown:
        raise ValueError(f"unknown reasons {sorted(unknown)}; known: {list(codec.REASONS)}")
    topic = settings.dlq_topic
    group = f"{settings.topic_prefix}-dlq-replay"
    consumer = Consumer(consumer_config(settings, group, **{"enable.auto.commit": False}))
    producer = Producer(producer_config(settings))
    counts: Counter[str] = Counter()
    by_reason: Counter[str] = Counter()
    refused: list[dict[str, Any]] = []
    try:
        partitions = consumer.list_topics(topic, timeout=15).topics[topic].partitions
        tps = [TopicPartition(topic, p) for p in partitions]
        start = consumer.committed(tps, timeout=15)
        ends = {tp.partition: high_watermark(consumer, topic, tp.partition) for tp in tps}
        consumer.assign(
            [TopicPartition(topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING)
             for tp in start]
        )  # fmt: skip
        position = {tp.partition: max(tp.offset, 0) for tp in start}
        deadline = time.monotonic() + timeout_s
        while any(position[p] < ends[p] for p in ends) and time.monotonic() < deadline:
            if max_records is not None and counts["replayed"] >= max_records:
                break
            m: Any = consumer.poll(0.5)
            if m is None or m.error() is not None:
                continue
            position[m.partition()] = m.offset() + 1
            if m.offset() >= ends[m.partition()]:
                continue
            counts["read"] += 1
            try:
                record = codec.decode_dlq(m.value() or b"")
                original = base64.b64decode(record.original_b64)
            except Exception:  # noqa: BLE001 - not a DLQ record: leave it
                counts["unreadable"] += 1
                continue
            if reasons and record.reason not in reasons:
                counts["skipped"] += 1
                continue
            if record.truncated:
                counts["truncated"] += 1
                refused.append(
                    {
                        "dlq_partition": m.partition(),
                        "dlq_offset": m.offset(),
                        "request_id": record.request_id,
                        "original_size": record.original_size,
                        "original_sha256": record.original_sha256,
                        "why": TRUNCATED_WHY,
                    }
                )
                continue
            by_reason[record.reason] += 1
            counts["replayed"] += 1
            if not dry_run:
                key = record.request_id.encode() if record.request_id else None
                origin = f"{topic}:{m.partition()}:{m.offset()}".encode()
                try:
                    produce(producer, to_topic or record.topic, original, key,
                            [(REPLAYED_HEADER, origin)])  # fmt: skip
                except RecordRejected as exc:  # left in the DLQ; the summary says why
                    counts["replayed"] -= 1
                    counts["rejected"] += 1
                    refused.append({"dlq_partition": m.partition(), "dlq_offset": m.offset(),
                                    "request_id": record.request_id, "why": str(exc)})  # fmt: skip
                producer.poll(0)
        if not dry_run:
            if producer.flush(30):
                raise RuntimeError("replayed records not delivered; offsets left uncommitted")
            done = [TopicPartition(topic, p, o) for p, o in position.items() if o > 0]
            if done:
                consumer.commit(offsets=done, asynchronous=False)
    finally:
        consumer.close()
    return {
        "dlq_topic": topic,
        "dry_run": dry_run,
        "read": counts["read"],
        "replayed": counts["replayed"],
        "skipped": counts["skipped"],
        "unreadable": counts["unreadable"],
        "truncated": counts["truncated"],
        "rejected": counts["rejected"],
        "refused": refused[:MAX_REFUSED_LISTED],
        "by_reason": dict(sorted(by_reason.items())),
    }
