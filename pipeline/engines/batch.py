"""The batch engine: the pipeline's stages on confluent-kafka, a batch at a time.

faust delivers one event at a time through several asyncio hops and sends each response
with its own future; that caps a worker at a few thousand requests/s. Here one loop takes
whatever the consumer has, runs the same `Pipeline` calls on the whole batch, and hands the
records to librdkafka's producer. Where a model runs (fused and infer stages), admitted
requests go to the device side (`engines/compute.py`), and a batch it flushes computes on
the device while the loop consumes and decodes the next records. Offsets are stored only once
everything published for a consumed batch (and every one before it) is delivered
(`engines/offsets.py`), or committed with the records in Kafka transactions
(`engines/transactions.py`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from pipeline.config import Settings
from pipeline.engines.compute import Compute
from pipeline.engines.flow import Backpressure, FlowControl
from pipeline.engines.offsets import ConsumedBatch, Offsets, OffsetTracker
from pipeline.engines.publisher import Publisher
from pipeline.engines.topology import Stage, consumed_topics, downstream
from pipeline.engines.transactions import Transactions
from pipeline.kafka import (
    consume_batch,
    consumer_config,
    producer_config,
)
from pipeline.observability.health import Health
from pipeline.serving import (
    Job,
    Origin,
    Outcome,
    Pipeline,
    Publication,
)

log = logging.getLogger(__name__)


class BatchEngine:
    """One stage (or the fused pipeline) as a consume-process-produce loop."""

    def __init__(
        self, settings: Settings, stage: Stage, pipeline: Pipeline, health: Health | None = None
    ) -> None:
        self.settings = settings
        self.stage = Stage(stage)
        self.pipeline = pipeline
        self.stop_event = threading.Event()
        self.transactional = settings.delivery == "exactly_once"
        self.consumer, self.producer = _clients(settings, self.stage, self.transactional)
        self.tracker = OffsetTracker(self.consumer)
        interval_s = settings.transaction_interval_ms / 1000.0
        self.txn = (
            Transactions(self.producer, self.consumer, interval_s) if self.transactional else None
        )
        after = downstream(settings, self.stage, pipeline.registry.names)
        self.backpressure = Backpressure(settings, *after) if after else None
        self.out = Publisher(self.producer, pipeline, self.backpressure, self.transactional)
        self.flow = FlowControl(
            self.consumer,
            settings.priority_topic if self.stage.admits else None,
            self.backpressure,
            pipeline.metrics.paused_partitions,
        )
        # Gateway and respond handle a consumed batch at once; fused and infer go through
        # the batcher (`_step`).
        self.process: Callable[[list[Origin]], list[Publication]] = (
            self._respond if self.stage == Stage.RESPOND else self._gateway
        )
        # Fused and infer stages batch per model and keep batches on the device while they
        # consume the next records (engines/compute.py).
        self.compute = (
            Compute(
                settings,
                pipeline,
                self.stage == Stage.FUSED and pipeline.features is not None,
                self._answer,
                self._publish,
            )
            if self.stage.computes
            else None
        )
        self.health = health or Health(settings.stall_timeout_s)
        self.health.models_ready = True  # loaded and warmed up by now, or loaded on demand

    def topics(self) -> list[str]:
        return consumed_topics(self.settings, self.stage, self.pipeline.registry.names)

    # -- the stages, a batch at a time ------------------------------------------------------

    def _admit(self, origins: list[Origin]) -> tuple[list[Job], list[Publication]]:
        jobs: list[Job] = []
        rejected: list[Publication] = []
        for admitted in self.pipeline.admit_many(origins):
            if isinstance(admitted, Job):
                jobs.append(admitted)
            else:
                rejected.append(admitted)
        return jobs, rejected

    def _gateway(self, origins: list[Origin]) -> list[Publication]:
        jobs, publications = self._admit(origins)
        jobs += [j.mirror for j in jobs if j.mirror is not None]  # experiments' shadows
        return publications + [self.pipeline.forward_record(j) for j in jobs]

    def _respond(self, origins: list[Origin]) -> list[Publication]:
        return [self.pipeline.respond_result_records(o) for o in origins]

    # -- the loop ---------------------------------------------------------------------------

    def run(self) -> None:
        """Consume, process and publish until `stop` is called (or SIGTERM/SIGINT)."""
        if self.txn is not None:
            self.txn.init()
        self.consumer.subscribe(self.topics(), on_assign=self._on_assign,
                                on_revoke=self._on_revoke)  # fmt: skip
        s = self.settings
        try:
            while not self.stop_event.is_set():
                self.health.beat()
                self.flow.update()
                if self.compute is not None:
                    self._step(self.compute)
                    continue
                messages = self._next_batch(s.max_batch_size, s.max_delay_s)
                if messages:
                    self._handle(messages)
                elif self.txn is not None:
                    self._commit()  # idle: do not hold answers back
                self.producer.poll(0)
                self.out.resend()
                self.tracker.settle()
        finally:
            self._finish()

    # -- the batched infer path (fused and infer stages) -------------------------------------

    def _step(self, compute: Compute) -> None:
        """Consume what there is room for, let the device side advance, commit when due."""
        room = compute.room
        messages = []
        if room > 0:
            wait_s = compute.wait_s()
            pending = compute.scheduler.pending
            if pending:
                # A batch is filling: librdkafka returns once it could be full, or when the
                # batcher's next flush is due.
                n = max(1, min(room, self.settings.max_batch_size - pending))
                messages = self.consumer.consume(n, wait_s)
            else:  # nothing waits: return on the first record
                n = min(room, self.settings.max_batch_size)
                messages = consume_batch(self.consumer, n, wait_s)
        if messages:
            origins, offsets = origins_of(messages)
            if offsets:
                compute.admit(origins, self.tracker.open(offsets))
        started = compute.advance(room)
        if self.txn is not None and self.txn.due(
            idle=not messages and not started and not compute.busy
        ):
            self._commit()
        self.producer.poll(0)
        if not self.transactional:
            self.out.resend()
            self.tracker.settle()

    def _answer(self, outcomes: list[Outcome]) -> None:
        """Publish outcomes, each counted against the consumed batch its job came in."""
        owner = {id(o.job.origin): o.job.owner for o in outcomes}
        publications = (
            self.pipeline.response_records(outcomes, "infer")
            if self.stage == Stage.FUSED
            else self.pipeline.result_records(outcomes)
        )
        if self.txn is not None:
            self.txn.begin()
        for origin, records in publications:
            self.out.send(records, owner[id(origin)], origin)
        for o in outcomes:  # answered: its offsets may be stored once delivered
            o.job.owner.held -= 1

    def _publish(self, publications: list[Publication], batch: ConsumedBatch) -> None:
        if self.txn is not None:
            self.txn.begin()  # a batch may finish after the last one was committed
        for origin, records in publications:
            self.out.send(records, batch, origin)

    def _drain(self) -> None:
        """Answer everything the device side holds (before partitions move, at the end)."""
        if self.compute is not None:
            self.compute.drain()

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
        origins, offsets = origins_of(messages)
        if not offsets:
            return
        if self.transactional:
            self._handle_transaction(offsets, origins)
            return
        batch = self.tracker.open(offsets)
        for origin, records in self.process(origins):
            self.out.send(records, batch, origin)  # not transactional here (handled above)

    def _handle_transaction(self, offsets: Offsets, origins: list[Origin]) -> None:
        """Gateway and respond stages under exactly-once: a consumed batch's records and
        offsets go into the open transaction. Any failure ends the process after an abort."""
        assert self.txn is not None
        self.txn.begin()
        try:
            for origin, records in self.process(origins):
                self.out.send(records, None, origin)
            self.txn.add(offsets)
            if self.txn.due():
                self._commit(settle=False)
        except BaseException:
            self.txn.abort()
            raise

    def _commit(self, settle: bool = True) -> None:
        """Commit the open transaction with the offsets of every settled batch: the one
        place a transaction commits."""
        assert self.txn is not None
        if settle:
            self.tracker.settle(self.txn.add)
        self.txn.commit()

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.health.assigned(len(partitions))
        self._feature_tables(partitions, assigned=True)
        self.flow.assigned(partitions)

    def _feature_tables(self, partitions: list[TopicPartition], assigned: bool) -> None:
        """The L2 feature table follows the requests topic's partitions: restored from its
        changelog before an assigned partition is consumed, closed when it is revoked."""
        features = self.pipeline.features
        if features is None or not self.stage.admits:
            return
        ps = [tp.partition for tp in partitions if tp.topic == self.settings.requests_topic]
        if ps:
            (features.assign if assigned else features.revoke)(ps)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.health.revoked()
        self.flow.revoked()
        if self.compute is not None:  # their fetches fill the tables about to close
            self.compute.admit_fetched(wait=True)
        self._feature_tables(partitions, assigned=False)
        self._drain()  # answer what the batcher holds before the partitions move
        if self.txn is not None:
            self._commit()  # before the partitions move to another worker
            return
        # Publish and store what was consumed before the partitions move to another worker.
        self.out.flush()
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
        try:
            self._drain()
        except Exception as exc:  # noqa: BLE001 - unanswered: consumed again on restart
            log.warning("draining the batcher: %s", exc)
        if self.txn is not None:
            try:
                self._commit()
            except Exception as exc:  # noqa: BLE001 - aborted: consumed again on restart
                log.warning("final transaction: %s", exc)
        drain_s = self.settings.drain_timeout_s
        remaining = self.producer.flush(drain_s) if self.transactional else self.out.flush(drain_s)
        if remaining == 0 and not self.transactional:
            try:
                self.tracker.settle()
                self.consumer.commit(asynchronous=False)
            except Exception as exc:  # noqa: BLE001
                log.debug("final commit: %s", exc)
        if self.compute is not None:
            self.compute.close()
        self.consumer.close()


def _clients(settings: Settings, stage: Stage, transactional: bool) -> tuple[Any, Any]:
    """The engine's consumer and producer, configured for its delivery guarantee."""
    group = settings.group_id(stage)
    offsets = (
        # Offsets go into each batch's transaction.
        {"enable.auto.commit": False, "isolation.level": "read_committed"}
        if transactional
        # Offsets are stored once a batch is delivered and committed in the background.
        else {"enable.auto.offset.store": False, "enable.auto.commit": True,
              "auto.commit.interval.ms": 1000}
    )  # fmt: skip
    consumer = Consumer(
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
    if transactional:
        # Stable per worker slot: a restarted worker fences its predecessor at once
        # (init_transactions aborts the open transaction) instead of waiting for the
        # broker to time it out, which holds the group's offsets until then.
        extra["transactional.id"] = f"{group}-{settings.worker_id}"
        # Longer than a leader's failover (the broker session timeout, 9 s by default, then
        # a metadata refresh): the records in flight outlive it instead of timing out, which
        # would abort the transaction and end the worker.
        extra["transaction.timeout.ms"] = 30_000
    producer = Producer(producer_config(settings, **extra))
    return consumer, producer


def origins_of(messages: list[Any]) -> tuple[list[Origin], Offsets]:
    """The records' origins (consumer errors left out), and the last offset consumed of
    each partition among them."""
    origins: list[Origin] = []
    offsets: Offsets = {}
    for m in messages:
        err = m.error()
        if err is not None:
            if err.code() != KafkaError._PARTITION_EOF:
                log.warning("consumer error: %s", err)
            continue
        topic, partition, offset = m.topic(), m.partition(), m.offset()
        offsets[(topic, partition)] = offset
        _, ts = m.timestamp()
        origins.append(
            Origin(topic, partition, offset, float(ts), m.value(), m.headers() or [],
                   key_bytes=len(m.key() or b""))
        )  # fmt: skip
    return origins, offsets
