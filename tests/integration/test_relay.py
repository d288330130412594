"""The peers benchmark's guarded relay does what its name says: every request it takes is
answered, and its group commits offsets covering exactly what it answered. Its consumer
stores no offset itself (``enable.auto.offset.store`` off, as the batch engine's): each one
committed was stored by its `OffsetTracker`, once the batch's records were delivered."""

from __future__ import annotations

import json
import time
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from benchmarks.harness import demo_request
from pipeline.kafka import consumer_config, producer_config, topic_reader
from pipeline.ops import procs


def test_guarded_relay_answers_and_commits_what_it_answered(settings, tmp_path: Path) -> None:
    n = 60
    relay = procs.spawn_workers(settings, "guarded-relay", tmp_path)
    try:
        producer = Producer(producer_config(settings))
        for i in range(n):
            value = json.dumps(demo_request(f"g{i}")).encode()
            producer.produce(settings.requests_topic, value, f"k{i}".encode())
        assert producer.flush(10) == 0
        reader = topic_reader(settings, settings.responses_topic, "relay-reader", "read_committed")
        ids: set[str] = set()
        deadline = time.monotonic() + 60
        while len(ids) < n and time.monotonic() < deadline:
            m = reader.poll(0.2)
            if m is not None and m.error() is None:
                ids.add(json.loads(m.value())["id"])  # the request itself, relayed
        reader.close()
        assert ids == {f"g{i}" for i in range(n)}
    finally:
        procs.stop(relay)  # SIGTERM: the relay settles and commits on its way out
    log = "".join(p.read_text() for p in tmp_path.glob("*.log"))
    group = Consumer(consumer_config(settings, settings.group_id("relay")))
    partitions = [TopicPartition(settings.requests_topic, p) for p in range(settings.partitions)]
    committed = group.committed(partitions, timeout=10)
    group.close()
    assert sum(max(tp.offset, 0) for tp in committed) == n, log
