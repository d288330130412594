"""`pipeline.kafka.produce`: which produce failures end a record and which are waited out."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.kafka import RecordRejected, produce, record_error
from pipeline.protocol import codec


class FlakyProducer:
    """Raises the given exceptions from ``produce``, one per call, then accepts."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.produced: list[tuple[str, bytes | None]] = []
        self.polls: list[float] = []

    def produce(
        self, topic: str, value: bytes | None, key: Any = None, partition: int = -1, **_: Any
    ) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.produced.append((topic, value))

    def poll(self, timeout: float) -> int:
        self.polls.append(timeout)
        return 0


def kafka_error(code: int, fatal: bool = False, retriable: bool = False) -> KafkaException:
    return KafkaException(KafkaError(code, "x", fatal=fatal, retriable=retriable))


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (KafkaError.MSG_SIZE_TOO_LARGE, codec.RECORD_TOO_LARGE),
        (KafkaError.RECORD_LIST_TOO_LARGE, codec.RECORD_TOO_LARGE),
        (KafkaError.TOPIC_EXCEPTION, codec.DELIVERY_FAILED),
        (KafkaError.TOPIC_AUTHORIZATION_FAILED, codec.DELIVERY_FAILED),
        (KafkaError._UNKNOWN_TOPIC, codec.DELIVERY_FAILED),
    ],
)
def test_a_record_the_producer_refuses_for_itself_is_rejected_with_a_reason(
    code: int, reason: str
) -> None:
    producer = FlakyProducer(kafka_error(code))
    with pytest.raises(RecordRejected) as caught:
        produce(producer, "t", b"v")
    assert caught.value.code == reason and producer.produced == []


def test_a_full_queue_and_transient_errors_are_waited_out() -> None:
    producer = FlakyProducer(
        BufferError("queue full"),
        kafka_error(KafkaError._TRANSPORT, retriable=True),
        kafka_error(KafkaError._TRANSPORT, retriable=True),
    )
    produce(producer, "t", b"v")
    assert producer.produced == [("t", b"v")]
    # Served deliveries while the queue was full, then backed off, doubling.
    assert producer.polls[1:] == [0.005, 0.01]


def test_a_fatal_error_is_raised() -> None:
    producer = FlakyProducer(kafka_error(KafkaError._FATAL, fatal=True))
    with pytest.raises(KafkaException):
        produce(producer, "t", b"v")


def test_delivery_report_errors_are_classified_like_produce_errors() -> None:
    assert record_error(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE)) == codec.RECORD_TOO_LARGE
    assert record_error(KafkaError(KafkaError._MSG_TIMED_OUT)) is None
    assert record_error(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)) == codec.DELIVERY_FAILED

    class MessageSizeTooLargeError(Exception):  # aiokafka's name for it
        pass

    assert record_error(MessageSizeTooLargeError()) == codec.RECORD_TOO_LARGE
    assert record_error(RuntimeError("no")) is None
