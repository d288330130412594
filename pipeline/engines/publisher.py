"""Publishing a consumed batch's records: each produced counted against its batch, a record
the producer or the broker refuses for itself replaced (`Pipeline.undeliverable`), one that
failed for the broker's reasons produced again. The loop asks it to `Publisher.send`, to
`Publisher.resend` what failed on every turn, and to `Publisher.flush` before partitions
move and at the end."""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from pipeline.engines.flow import Backpressure
from pipeline.engines.offsets import ConsumedBatch
from pipeline.kafka import RecordRejected, produce, record_error
from pipeline.serving import Origin, Pipeline, Record

log = logging.getLogger(__name__)


class Publisher:
    """The engine's producer, with the bookkeeping of what it has in flight."""

    def __init__(
        self,
        producer: Any,
        pipeline: Pipeline,
        backpressure: Backpressure | None,
        transactional: bool,
    ) -> None:
        self.producer = producer
        self.pipeline = pipeline
        self.backpressure = backpressure
        self.transactional = transactional
        # Records whose delivery report was an error, to produce again or replace (`resend`).
        self._failed: list[tuple[ConsumedBatch, Origin, Record, bool, KafkaError]] = []

    def send(
        self,
        records: list[Record],
        batch: ConsumedBatch | None,
        origin: Origin,
        replacing: bool = False,
    ) -> None:
        """Produce ``origin``'s records counted against ``batch`` (in the open transaction,
        exactly-once). A record the producer refuses for itself is replaced at once
        (`Pipeline.undeliverable`); ``replacing`` marks such replacements."""
        counted = None if self.transactional else batch  # offsets stored once delivered
        counting = self.backpressure is not None
        producer = self.producer
        for r in records:
            bp = self._counting(r.topic) if counting else None
            if bp is not None:
                bp.sent += 1  # counted before produce: an estimate errs on the high side
            report: Callable[[KafkaError | None, Any], None] | None
            if counted is not None:
                counted.outstanding += 1
                report = functools.partial(self._delivered, counted, origin, r, replacing)
            else:
                report = bp.report if bp is not None else None
            try:
                try:  # the usual case at once; `produce` waits out a full queue, retries
                    producer.produce(r.topic, r.value, r.key, -1, headers=r.headers,
                                     on_delivery=report)  # fmt: skip
                except (BufferError, KafkaException):
                    produce(producer, r.topic, r.value, r.key, r.headers, report)
            except RecordRejected as exc:
                if counted is not None:
                    counted.outstanding -= 1
                if bp is not None:
                    bp.gone += 1  # never produced
                self.send(self.pipeline.undeliverable(origin, r, exc.code, exc.message, replacing),
                           batch, origin, replacing=True)  # fmt: skip

    def _counting(self, topic: str) -> Backpressure | None:
        """The backpressure that counts records produced to ``topic``, if any."""
        bp = self.backpressure
        return bp if bp is not None and topic in bp.downstream else None

    def _delivered(
        self,
        batch: ConsumedBatch,
        origin: Origin,
        record: Record,
        replacing: bool,
        err: KafkaError | None,
        msg: Any,
    ) -> None:
        batch.outstanding -= 1
        bp = self._counting(record.topic) if self.backpressure is not None else None
        if bp is not None:
            bp.report(err, msg)  # a record produced again counts as sent again
        if err is not None:
            batch.held += 1  # its offsets wait until the record is produced again or replaced
            self._failed.append((batch, origin, record, replacing, err))

    def resend(self) -> None:
        """Deal with the records whose delivery failed: a record the broker refused for itself
        is replaced (`Pipeline.undeliverable`); one that failed for the broker's reasons
        (librdkafka retried it for message.timeout.ms) is produced again."""
        while self._failed:
            failed, self._failed = self._failed, []
            for batch, origin, record, replacing, err in failed:
                batch.held -= 1
                code = record_error(err)
                if code is None:
                    log.warning("delivery to %s failed, producing again: %s", record.topic, err)
                    self.send([record], batch, origin, replacing)
                else:
                    replacements = self.pipeline.undeliverable(
                        origin, record, code, err.str(), replacing
                    )
                    self.send(replacements, batch, origin, replacing=True)

    def flush(self, timeout_s: float = 30.0) -> int:
        """Deliver everything produced, failed deliveries included (produced again or
        replaced); returns how many records are still undelivered after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        remaining = self.producer.flush(timeout_s)
        while self._failed and time.monotonic() < deadline:
            self.resend()
            remaining = self.producer.flush(max(0.0, deadline - time.monotonic()))
        return remaining + len(self._failed)
