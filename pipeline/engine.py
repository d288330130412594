"""The batch engine: the pipeline's stages on confluent-kafka, a batch at a time.

faust delivers one event at a time through several asyncio hops and sends each response
with its own future; that caps a worker at a few thousand requests/s. Here one loop takes
whatever the consumer has (up to ``max_batch_size``, waiting at most ``max_delay_s`` after
the first record), runs the same `Pipeline` calls on the whole batch, and hands the
records to librdkafka's producer. Offsets are stored only once everything published for
a batch (and every batch before it) is delivered, so at-least-once holds across crashes.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from pipeline.backpressure import Backpressure, downstream_of
from pipeline.config import Settings
from pipeline.kafka import consume_batch, consumer_config, producer_config
from pipeline.stages import Job, Origin, Pipeline, Publication, Record

log = logging.getLogger(__name__)
STAGES = ("fused", "gateway", "infer", "respond")


class _Batch:
    """Deliveries outstanding for one consumed batch, and the offsets it covers."""

    __slots__ = ("offsets", "outstanding", "failed")

    def __init__(self, offsets: dict[tuple[str, int], int]) -> None:
        self.offsets = offsets
        self.outstanding = 0
        self.failed: KafkaError | None = None

    def on_delivery(self, err: KafkaError | None, _msg: Any) -> None:
        self.outstanding -= 1
        if err is not None and self.failed is None:
            self.failed = err


class OffsetTracker:
    """Stores a batch's offsets once it and every earlier batch are fully delivered."""

    def __init__(self, consumer: Consumer) -> None:
        self.consumer = consumer
        self.pending: deque[_Batch] = deque()

    def open(self, messages: Sequence[Any]) -> _Batch:
        offsets: dict[tuple[str, int], int] = {}
        for m in messages:
            offsets[(m.topic(), m.partition())] = m.offset()
        batch = _Batch(offsets)
        self.pending.append(batch)
        return batch

    def settle(self) -> None:
        while self.pending and self.pending[0].outstanding == 0:
            batch = self.pending.popleft()
            if batch.failed is not None:
                # librdkafka retried until message.timeout.ms: nothing more can be done here
                # without acking a request that was not answered. Stop; the records are
                # consumed again from the last stored offset.
                raise RuntimeError(f"publish failed after retries: {batch.failed}")
            self.consumer.store_offsets(
                offsets=[TopicPartition(t, p, o + 1) for (t, p), o in batch.offsets.items()]
            )


class BatchEngine:
    """One stage (or the fused pipeline) as a consume-process-produce loop."""

    def __init__(self, settings: Settings, stage: str, pipeline: Pipeline) -> None:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.settings = settings
        self.stage = stage
        self.pipeline = pipeline
        self.stop_event = threading.Event()
        self.transactional = settings.delivery == "exactly_once"
        group = settings.group_id(stage)
        offsets = (
            # Offsets go into each batch's transaction.
            {"enable.auto.commit": False, "isolation.level": "read_committed"}
            if self.transactional
            # Offsets are stored once a batch is delivered and committed in the background.
            else {"enable.auto.offset.store": False, "enable.auto.commit": True,
                  "auto.commit.interval.ms": 1000}
        )  # fmt: skip
        self.consumer = Consumer(
            consumer_config(
                settings,
                group,
                **offsets,
                **{
                    "session.timeout.ms": settings.session_timeout_ms,
                    "heartbeat.interval.ms": max(100, settings.session_timeout_ms // 3),
                    # Bounds what waits in this process: the rest waits in Kafka.
                    "queued.max.messages.kbytes": 16384,
                },
            )
        )
        extra: dict[str, Any] = {}
        if self.transactional:
            # Stable per worker slot: a restarted worker fences its predecessor at once
            # (init_transactions aborts the open transaction) instead of waiting for the
            # broker to time it out, which holds the group's offsets until then.
            extra["transactional.id"] = f"{group}-{settings.worker_id}"
            extra["transaction.timeout.ms"] = 10_000
        self.producer = Producer(producer_config(settings, **extra))
        self.tracker = OffsetTracker(self.consumer)
        self._txn_started: float | None = None
        self._priority_hold = False
        self._txn_offsets: dict[tuple[str, int], int] = {}
        downstream = downstream_of(settings, stage, pipeline.registry.names)
        self.backpressure = (
            Backpressure(settings, *downstream, pipeline.metrics.paused_partitions)
            if downstream
            else None
        )
        self.process: Callable[[list[Origin]], list[Publication]] = {
            "fused": self._fused,
            "gateway": self._gateway,
            "infer": self._infer,
            "respond": self._respond,
        }[stage]

    def topics(self) -> list[str]:
        s = self.settings
        if self.stage in ("fused", "gateway"):
            return [s.priority_topic, s.requests_topic]
        if self.stage == "infer":
            return [s.infer_topic(m) for m in self.pipeline.registry.names]
        return [s.results_topic]

    # -- the stages, a batch at a time ------------------------------------------------------

    def _admit(self, origins: list[Origin]) -> tuple[list[Job], list[Publication]]:
        jobs: list[Job] = []
        rejected: list[Publication] = []
        for origin in origins:
            admitted = self.pipeline.admit_or_reject(origin)
            if isinstance(admitted, Job):
                jobs.append(admitted)
            else:
                rejected.append(admitted)
        return jobs, rejected

    def _fused(self, origins: list[Origin]) -> list[Publication]:
        jobs, publications = self._admit(origins)
        if jobs:
            publications += self.pipeline.response_records(self.pipeline.infer(jobs), "infer")
        return publications

    def _gateway(self, origins: list[Origin]) -> list[Publication]:
        jobs, publications = self._admit(origins)
        return publications + [self.pipeline.forward_record(j) for j in jobs]

    def _infer(self, origins: list[Origin]) -> list[Publication]:
        jobs, publications = self._admit(origins)
        if jobs:
            publications += self.pipeline.result_records(self.pipeline.infer(jobs))
        return publications

    def _respond(self, origins: list[Origin]) -> list[Publication]:
        return [self.pipeline.respond_result_records(o) for o in origins]

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Consume, process and publish until `stop` is called (or SIGTERM/SIGINT)."""
        if self.transactional:
            self.producer.init_transactions(30)
        self.consumer.subscribe(self.topics(), on_assign=self._on_assign,
                                on_revoke=self._on_revoke)  # fmt: skip
        s = self.settings
        try:
            while not self.stop_event.is_set():
                if self.backpressure is not None:
                    self.backpressure.update(self.consumer)
                self._prioritize()
                messages = self._next_batch(s.max_batch_size, s.max_delay_s)
                if messages:
                    self._handle(messages)
                elif self.transactional:
                    self._commit_transaction()  # idle: do not hold answers back
                self.producer.poll(0)
                self.tracker.settle()
        finally:
            self._finish()

    def _next_batch(self, max_batch_size: int, max_delay_s: float) -> list[Any]:
        """Up to ``max_batch_size`` records, waiting at most ``max_delay_s`` after the first."""
        messages = consume_batch(self.consumer, max_batch_size, 0.1)
        if messages and len(messages) < max_batch_size and max_delay_s > 0:
            # The window counts from when the oldest request was produced: one that already
            # waited in Kafka (the usual case under load) is not held back again.
            _, produced_ms = messages[0].timestamp()
            remaining_s = max_delay_s - (time.time() - produced_ms / 1000.0)
            if remaining_s > 0:
                # librdkafka returns when the batch is full or the window has passed.
                more = self.consumer.consume(max_batch_size - len(messages), remaining_s)
                messages += more
        return messages

    def _handle(self, messages: list[Any]) -> None:
        origins: list[Origin] = []
        consumed: list[Any] = []
        for m in messages:
            err = m.error()
            if err is not None:
                if err.code() != KafkaError._PARTITION_EOF:
                    log.warning("consumer error: %s", err)
                continue
            _, ts = m.timestamp()
            consumed.append(m)
            origins.append(
                Origin(
                    m.topic(), m.partition(), m.offset(), float(ts), m.value(), m.headers() or []
                )
            )
        if not consumed:
            return
        if self.transactional:
            self._handle_transaction(consumed, origins)
            return
        batch = self.tracker.open(consumed)
        for _origin, records in self.process(origins):
            for r in records:
                batch.outstanding += 1
                self._produce(r, batch.on_delivery)

    def _produce(self, r: Record, on_delivery: Any = None) -> None:
        while True:
            try:
                self.producer.produce(r.topic, r.value, r.key, headers=r.headers,  # type: ignore[arg-type]
                                      on_delivery=on_delivery)  # fmt: skip
                return
            except BufferError:
                self.producer.poll(0.005)

    def _handle_transaction(self, consumed: list[Any], origins: list[Origin]) -> None:
        """Batches, their records and their consumed offsets as Kafka transactions.

        A transaction spans the batches of ``transaction_interval_ms`` (a commit costs
        several broker round trips). Any failure ends the process after an abort: the records
        are consumed again from the last committed transaction, and read_committed readers
        never see a duplicate.
        """
        producer = self.producer
        if self._txn_started is None:
            producer.begin_transaction()
            self._txn_started = time.monotonic()
        try:
            for _origin, records in self.process(origins):
                for r in records:
                    self._produce(r)
            for m in consumed:
                self._txn_offsets[(m.topic(), m.partition())] = m.offset() + 1
            interval_s = self.settings.transaction_interval_ms / 1000.0
            if time.monotonic() - self._txn_started >= interval_s:
                self._commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                producer.abort_transaction(10)
            raise

    def _commit_transaction(self) -> None:
        if self._txn_started is None:
            return
        self.producer.send_offsets_to_transaction(
            [TopicPartition(t, p, o) for (t, p), o in self._txn_offsets.items()],
            self.consumer.consumer_group_metadata(),
            30,
        )
        self.producer.commit_transaction(30)
        self._txn_offsets.clear()
        self._txn_started = None

    def _prioritize(self) -> None:
        """Serve the priority topic first: while it has a backlog, the rest waits in Kafka.

        Reads only librdkafka's cached high watermarks and positions (no broker round trip).
        """
        if self.stage not in ("fused", "gateway"):
            return
        if self.backpressure is not None and self.backpressure.paused:
            self._priority_hold = False  # all paused; resuming resumes all
            return
        priority = self.settings.priority_topic
        assignment = self.consumer.assignment()
        urgent = [tp for tp in assignment if tp.topic == priority]
        backlog = 0
        if urgent:
            for tp in self.consumer.position(urgent):
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                # Before the first record of a partition is consumed its position is unknown:
                # count from the low watermark until then.
                position = tp.offset if tp.offset >= 0 else low
                if high > position >= 0:
                    backlog += high - position
        want = backlog > 0
        if want != self._priority_hold:
            normal = [tp for tp in assignment if tp.topic != priority]
            if normal:
                (self.consumer.pause if want else self.consumer.resume)(normal)
            self._priority_hold = want

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.backpressure is not None and self.backpressure.paused:
            consumer.pause(partitions)
        elif self._priority_hold:
            consumer.pause([tp for tp in partitions if tp.topic != self.settings.priority_topic])

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        if self.transactional:
            self._commit_transaction()  # before the partitions move to another worker
            return
        # Publish and store what was consumed before the partitions move to another worker.
        self.producer.flush(30)
        self.tracker.settle()
        try:
            consumer.commit(asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - nothing stored yet is fine
            log.debug("commit on revoke: %s", exc)

    def stop(self) -> None:
        self.stop_event.set()

    def _finish(self) -> None:
        if self.backpressure is not None:
            self.backpressure.close()
        if self.transactional:
            try:
                self._commit_transaction()
            except Exception as exc:  # noqa: BLE001 - aborted: consumed again on restart
                log.warning("final transaction: %s", exc)
        remaining = self.producer.flush(30)
        if remaining == 0 and not self.transactional:
            try:
                self.tracker.settle()
                self.consumer.commit(asynchronous=False)
            except Exception as exc:  # noqa: BLE001
                log.debug("final commit: %s", exc)
        self.consumer.close()


def install_signal_handlers(engine: BatchEngine) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: engine.stop())
