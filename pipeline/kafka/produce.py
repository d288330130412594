"""Producing one record: a full queue and transient errors waited out, a record Kafka
refuses for itself raised as `RecordRejected` with the reason code its request ends with."""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from pipeline.errors import SluiceError
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


class RecordRejected(SluiceError):
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
