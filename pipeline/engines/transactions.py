"""Exactly-once delivery: the records published for consumed batches and those batches'
offsets commit together, in Kafka transactions.

A transaction spans the batches of ``transaction_interval_ms`` (a commit costs several broker
round trips). `Transactions.begin` is the one place a transaction begins (before the first
record of one is produced), `Transactions.commit` the one place it commits, with the offsets
the loop handed it (`Transactions.add`). A failure aborts; the records are consumed again
from the last committed transaction, and read_committed readers never see a duplicate.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaException, TopicPartition

from pipeline.engines.offsets import Offsets

log = logging.getLogger(__name__)


class Transactions:
    """The open transaction of one producer, and the consumed offsets it will commit."""

    def __init__(self, producer: Any, consumer: Any, interval_s: float,
                 timeout_s: float = 30.0) -> None:  # fmt: skip
        self.producer = producer
        self.consumer = consumer
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.started: float | None = None  # monotonic time the open transaction began
        self.offsets: dict[tuple[str, int], int] = {}  # next offset to consume, per partition

    def init(self) -> None:
        """Fence a predecessor with the same transactional.id (its open transaction aborts)."""
        self.producer.init_transactions(self.timeout_s)

    def begin(self) -> None:
        """Open a transaction unless one is open."""
        if self.started is None:
            self.producer.begin_transaction()
            self.started = time.monotonic()

    def add(self, offsets: Offsets) -> None:
        """Consumed offsets (the last one per partition) to commit with the transaction."""
        for tp, offset in offsets.items():
            self.offsets[tp] = offset + 1

    def due(self, idle: bool = False) -> bool:
        """Whether the open transaction should commit now: its interval has passed, or the
        loop is idle (answers are not held back for a full interval)."""
        if self.started is None:
            return False
        return idle or time.monotonic() - self.started >= self.interval_s

    def commit(self) -> None:
        """Commit the open transaction with its offsets (nothing when none is open)."""
        if self.started is None:
            return
        self._retrying(
            self.producer.send_offsets_to_transaction,
            [TopicPartition(t, p, o) for (t, p), o in self.offsets.items()],
            self.consumer.consumer_group_metadata(),
            self.timeout_s,
        )
        self._retrying(self.producer.commit_transaction, self.timeout_s)
        self.offsets.clear()
        self.started = None

    def _retrying(self, call: Callable[..., Any], *args: Any) -> None:
        """A transactional call, made again while it fails with a retriable error (the
        coordinator moving to another broker, say), for up to ``timeout_s``; librdkafka
        allows repeating these calls. Other errors raise: the caller aborts."""
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                call(*args)
                return
            except KafkaException as exc:
                err = exc.args[0]
                if not err.retriable() or time.monotonic() >= deadline:
                    raise
                log.warning("transaction: %s; trying again", err)
                time.sleep(0.2)

    def abort(self) -> None:
        """Abort the open transaction (best effort: the broker aborts it at its timeout)."""
        if self.started is None:
            return
        with contextlib.suppress(Exception):
            self.producer.abort_transaction(10)
        self.offsets.clear()
        self.started = None
