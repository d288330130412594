"""Kafka client configuration (confluent-kafka and faust/aiokafka) and topic creation."""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from pipeline.config import Settings
from pipeline.protocol import codec

log = logging.getLogger(__name__)

# Produce failures that are about the record itself, by the reason code its request ends with:
# retrying the same record cannot succeed. Every other failure is the broker's or the
# client's (a full queue, a broker down) and is retried.
_RECORD_ERRORS = {
    KafkaError.MSG_SIZE_TOO_LARGE: codec.RECORD_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE: codec.RECORD_TOO_LARGE,
    KafkaError.INVALID_RECORD: codec.DELIVERY_FAILED,
    KafkaError.TOPIC_EXCEPTION: codec.DELIVERY_FAILED,  # an invalid topic name
    KafkaError.TOPIC_AUTHORIZATION_FAILED: codec.DELIVERY_FAILED,
    KafkaError.POLICY_VIOLATION: codec.DELIVERY_FAILED,
    KafkaError._UNKNOWN_TOPIC: codec.DELIVERY_FAILED,
    KafkaError.UNKNOWN_TOPIC_OR_PART: codec.DELIVERY_FAILED,
}
# The same failures as aiokafka (the faust engine's client) raises them.
_AIOKAFKA_RECORD_ERRORS = {
    "MessageSizeTooLargeError": codec.RECORD_TOO_LARGE,
    "RecordTooLargeError": codec.RECORD_TOO_LARGE,
    "RecordListTooLargeError": codec.RECORD_TOO_LARGE,
    "CorruptRecordException": codec.DELIVERY_FAILED,
    "InvalidTopicError": codec.DELIVERY_FAILED,
    "TopicAuthorizationFailedError": codec.DELIVERY_FAILED,
    "UnknownTopicOrPartitionError": codec.DELIVERY_FAILED,
}
PRODUCE_BACKOFF_MAX_S = 1.0


class RecordRejected(Exception):
    """The producer or the broker refuses this record itself; ``code`` is the reason code
    for the request it belongs to."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def record_error(error: BaseException | KafkaError) -> str | None:
    """The reason code when ``error`` (a produce call's exception or a delivery report's
    error, from confluent-kafka or aiokafka) says the record itself cannot be produced;
    None when it is the broker's or the client's failure."""
    if isinstance(error, KafkaException) and error.args:
        error = error.args[0]
    if isinstance(error, KafkaError):
        return _RECORD_ERRORS.get(error.code())
    return _AIOKAFKA_RECORD_ERRORS.get(type(error).__name__)


def produce(
    producer: Any,
    topic: str,
    value: bytes | None,
    key: bytes | None = None,
    headers: Any = None,
    on_delivery: Any = None,
    partition: int = -1,
) -> None:
    """Hand one record to librdkafka's producer, waiting while it cannot take it yet.

    A full queue is waited out by serving delivery reports; a transient client error is
    retried with exponential backoff (to `PRODUCE_BACKOFF_MAX_S`).

    Raises:
        RecordRejected: the record itself can never be produced (too large, invalid topic).
        KafkaException: a fatal or otherwise unrecoverable producer error.
    """
    backoff_s = 0.005
    while True:
        try:
            producer.produce(topic, value, key, partition, headers=headers, on_delivery=on_delivery)
            return
        except BufferError:  # the local queue is full: deliveries make room
            producer.poll(0.005)
        except KafkaException as exc:
            err = exc.args[0]
            code = _RECORD_ERRORS.get(err.code())
            if code is not None:
                raise RecordRejected(code, err.str()) from None
            if err.fatal() or not err.retriable():
                raise
            log.warning("produce to %s failed, retrying in %.3f s: %s", topic, backoff_s, err)
            producer.poll(backoff_s)
            backoff_s = min(backoff_s * 2, PRODUCE_BACKOFF_MAX_S)


def confluent_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Common librdkafka settings: bootstrap servers and SASL/SSL."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers(),
        "security.protocol": settings.security_protocol,
        # Small request/response records: without this, Nagle + delayed ACKs add ~40 ms.
        "socket.nagle.disable": True,
    }
    if settings.sasl_mechanism:
        config["sasl.mechanism"] = settings.sasl_mechanism
    if settings.sasl_username is not None:
        config["sasl.username"] = settings.sasl_username
    if settings.sasl_password is not None:
        config["sasl.password"] = settings.sasl_password
    if settings.ssl_cafile:
        config["ssl.ca.location"] = settings.ssl_cafile
    if settings.ssl_certfile:
        config["ssl.certificate.location"] = settings.ssl_certfile
    if settings.ssl_keyfile:
        config["ssl.key.location"] = settings.ssl_keyfile
    config.update(extra)
    return config


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return confluent_config(
        settings,
        **{
            "linger.ms": settings.producer_linger_ms,
            "compression.type": settings.compression_type,
            "enable.idempotence": True,
            "acks": "all",
            "message.max.bytes": settings.max_record_bytes,
            **extra,
        },
    )


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    return confluent_config(
        settings,
        **{
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "fetch.wait.max.ms": settings.consumer_fetch_max_wait_ms,
            "fetch.min.bytes": settings.consumer_fetch_min_bytes,
            "fetch.message.max.bytes": max(settings.max_payload_bytes * 2, 1_048_576),
            # When the prefetch queue is full (queued.max.messages.kbytes, 64 MB: ~20k records
            # of 3 KB), librdkafka waits fetch.queue.backoff.ms, 1 s by default, before it
            # fetches again: a consumer with a backlog of large records then starves for most
            # of each second (seen: a ResNet worker idle in poll 21 % of its time).
            "fetch.queue.backoff.ms": 10,
            **extra,
        },
    )


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


def faust_credentials(settings: Settings) -> Any:
    """The faust ``broker_credentials`` for the configured security protocol, or None."""
    import faust

    context = None
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.ssl_cafile)
        if settings.ssl_certfile:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            ssl_context=context,
            mechanism=settings.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None


def ensure_topics(settings: Settings, topics: list[str], partitions: int | None = None) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    admin = AdminClient(confluent_config(settings))
    existing = set(admin.list_topics(timeout=15).topics)
    wanted = [
        NewTopic(
            t,
            num_partitions=partitions or settings.partitions,
            replication_factor=settings.replication_factor,
        )
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
        *(settings.infer_topic(m) for m in models),
    ]


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
