"""The broker version works with every client sluice uses: confluent-kafka (librdkafka),
aiokafka (faust's driver) and faust itself — topic creation, consumer groups, transactions."""

from __future__ import annotations

import asyncio
import uuid

from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from pipeline.kafka import consumer_config, ensure_topics, producer_config


def _name(tag: str) -> str:
    return f"compat-{tag}-{uuid.uuid4().hex[:8]}"


def test_confluent_topics_groups_and_transactions(settings) -> None:
    topic = _name("ck")
    ensure_topics(settings, [topic], partitions=3)
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers()})
    assert len(admin.list_topics(topic, timeout=10).topics[topic].partitions) == 3

    producer = Producer(producer_config(settings, **{"transactional.id": _name("txn")}))
    producer.init_transactions(10)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(topic, f"committed-{i}".encode(), str(i).encode())
    producer.commit_transaction(10)
    producer.begin_transaction()
    producer.produce(topic, b"aborted", b"x")
    producer.abort_transaction(10)

    group = _name("group")
    consumer = Consumer(
        consumer_config(
            settings, group, **{"isolation.level": "read_committed", "enable.auto.commit": False}
        )
    )
    consumer.subscribe([topic])
    seen: list[bytes] = []
    for _ in range(100):
        m = consumer.poll(0.3)
        if m is not None and m.error() is None:
            seen.append(m.value())
            consumer.commit(m, asynchronous=False)
        if len(seen) >= 10:
            break
    assert sorted(seen) == sorted(f"committed-{i}".encode() for i in range(10))
    assert consumer.poll(1.0) is None  # the aborted record is never delivered
    committed = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=10)
    assert sum(tp.offset for tp in committed if tp.offset > 0) >= 10
    consumer.close()


def test_aiokafka_topics_groups_and_transactions(settings) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    bootstrap = settings.bootstrap_servers()
    topic = _name("aio")

    async def scenario() -> list[bytes]:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        finally:
            await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, transactional_id=_name("txn"))
        await producer.start()
        try:
            async with producer.transaction():
                for i in range(5):
                    await producer.send(topic, f"v{i}".encode(), key=b"k")
            await producer.begin_transaction()
            await producer.send(topic, b"aborted", key=b"k")
            await producer.abort_transaction()
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=_name("group"),
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            enable_auto_commit=False,
        )
        await consumer.start()
        values: list[bytes] = []
        try:
            while len(values) < 5:
                batch = await consumer.getmany(timeout_ms=5000)
                assert batch, "no records within 5 s"
                for records in batch.values():
                    values.extend(r.value for r in records)
            await consumer.commit()
            extra = await consumer.getmany(timeout_ms=1000)
            assert not any(extra.values())
        finally:
            await consumer.stop()
        return values

    assert asyncio.run(scenario()) == [f"v{i}".encode() for i in range(5)]


def test_faust_declares_topics_on_this_broker(settings) -> None:
    """faust creates topics through aiokafka's CreateTopics, which the broker accepts."""
    from agents.app import create_app

    topic_name = _name("faust")
    app = create_app(settings, "compat")

    async def scenario() -> None:
        topic = app.topic(topic_name, partitions=2, internal=True, value_serializer="raw")
        await app.producer.start()
        try:
            await topic.maybe_declare()
            await topic.send(value=b"hello")
            await app.producer.flush()
        finally:
            await app.producer.stop()

    asyncio.run(scenario())
    admin = AdminClient({"bootstrap.servers": settings.bootstrap_servers()})
    assert len(admin.list_topics(topic_name, timeout=10).topics[topic_name].partitions) == 2
