"""The batch engine's delivery objects without a broker: offsets stored only for a settled
prefix of consumed batches (at-least-once), and transactions that begin once and commit the
offsets they were handed (exactly-once)."""

from __future__ import annotations

from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message

from pipeline.engines.batch import origins_of
from pipeline.engines.offsets import Offsets, OffsetTracker
from pipeline.engines.transactions import Transactions


def consumed(*at: tuple[str, int, int]) -> Offsets:
    """What the engine makes of messages consumed at these (topic, partition, offset)."""
    messages = [Message(topic=t, partition=p, offset=o, value=b"{}", timestamp=(1, 0))
                for t, p, o in at]  # fmt: skip
    origins, offsets = origins_of(messages)
    assert [(o.topic, o.partition, o.offset) for o in origins] == list(at)
    return offsets


class Recorder:
    """Stands in for the consumer and the producer: records the calls the objects make."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def store_offsets(self, offsets: list[Any]) -> None:
        self.calls.append(("store", sorted((tp.topic, tp.partition, tp.offset) for tp in offsets)))

    def consumer_group_metadata(self) -> str:
        return "group-metadata"

    def init_transactions(self, _timeout: float) -> None:
        self.calls.append(("init", None))

    def begin_transaction(self) -> None:
        self.calls.append(("begin", None))

    def send_offsets_to_transaction(self, offsets: list[Any], meta: str, _timeout: float) -> None:
        self.calls.append(
            ("offsets", sorted((tp.topic, tp.partition, tp.offset) for tp in offsets))
        )

    def commit_transaction(self, _timeout: float) -> None:
        self.calls.append(("commit", None))

    def abort_transaction(self, _timeout: float) -> None:
        self.calls.append(("abort", None))


def test_offsets_are_stored_for_the_settled_prefix_only() -> None:
    consumer = Recorder()
    tracker = OffsetTracker(consumer)
    first = tracker.open(consumed(("r", 0, 10), ("r", 0, 11), ("r", 1, 4)))
    second = tracker.open(consumed(("r", 0, 12)))
    first.outstanding, first.held = 2, 1  # two records in flight, one request in the batcher
    second.outstanding = 0
    tracker.settle()
    assert consumer.calls == []  # the second is settled, but the first is not: nothing moves
    first.outstanding = 0
    tracker.settle()
    assert consumer.calls == []  # still one request unanswered
    first.held = 0
    tracker.settle()
    # Both, in order: the next offset to consume, per partition.
    assert consumer.calls == [("store", [("r", 0, 12), ("r", 1, 5)]), ("store", [("r", 0, 13)])]
    assert not tracker.pending


def test_settled_offsets_can_go_to_a_transaction_instead() -> None:
    consumer = Recorder()
    tracker = OffsetTracker(consumer)
    tracker.open(consumed(("r", 0, 7)))
    handed: list[dict[tuple[str, int], int]] = []
    tracker.settle(handed.append)
    assert handed == [{("r", 0): 7}] and consumer.calls == []


def test_a_transaction_begins_once_and_commits_its_offsets() -> None:
    producer, consumer = Recorder(), Recorder()
    txn = Transactions(producer, consumer, interval_s=3600)
    txn.init()
    assert not txn.due(idle=True)  # nothing open: nothing to commit
    txn.commit()
    txn.begin()
    txn.begin()  # already open
    txn.add({("r", 0): 7, ("r", 1): 2})
    txn.add({("r", 0): 9})
    assert not txn.due() and txn.due(idle=True)
    txn.commit()
    assert producer.calls == [
        ("init", None),
        ("begin", None),
        ("offsets", [("r", 0, 10), ("r", 1, 3)]),
        ("commit", None),
    ]
    assert txn.started is None and txn.offsets == {}


def test_a_transaction_is_due_after_its_interval_and_aborts_cleanly() -> None:
    producer, consumer = Recorder(), Recorder()
    txn = Transactions(producer, consumer, interval_s=0.0)
    txn.begin()
    txn.add({("r", 0): 1})
    assert txn.due()
    txn.abort()
    assert producer.calls == [("begin", None), ("abort", None)]
    assert txn.started is None and txn.offsets == {}
    txn.abort()  # nothing open: nothing to abort
    assert producer.calls[-1] == ("abort", None) and len(producer.calls) == 2


class Flaky(Recorder):
    """A producer whose transactional calls fail ``failures`` times first, with ``error``."""

    def __init__(self, failures: int, retriable: bool) -> None:
        super().__init__()
        self.failures = failures
        self.error = KafkaError(KafkaError._TRANSPORT, "coordinator moved", retriable=retriable)

    def send_offsets_to_transaction(self, offsets: list[Any], meta: str, _timeout: float) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise KafkaException(self.error)
        super().send_offsets_to_transaction(offsets, meta, _timeout)


def test_a_commit_is_tried_again_while_its_error_is_retriable() -> None:
    producer = Flaky(failures=2, retriable=True)
    txn = Transactions(producer, Recorder(), interval_s=0.0)
    txn.begin()
    txn.add({("r", 0): 4})
    txn.commit()  # the coordinator moved twice, then answered
    assert producer.calls == [("begin", None), ("offsets", [("r", 0, 5)]), ("commit", None)]


def test_a_commit_error_that_is_not_retriable_raises() -> None:
    producer = Flaky(failures=1, retriable=False)
    txn = Transactions(producer, Recorder(), interval_s=0.0)
    txn.begin()
    with pytest.raises(KafkaException):
        txn.commit()
    assert producer.calls == [("begin", None)]


class Revoked(Recorder):
    def store_offsets(self, offsets: list[Any]) -> None:
        raise KafkaException(KafkaError(KafkaError._STATE, "StoreOffsets failed"))


def test_offsets_of_a_revoked_partition_are_dropped_not_raised() -> None:
    tracker = OffsetTracker(Revoked())
    batch = tracker.open(consumed(("r", 0, 3)))
    batch.outstanding = 0
    tracker.settle()  # the partition moved in a rebalance: its new owner re-reads it
    assert not tracker.pending
