"""The batch engine: the pipeline's stages on confluent-kafka, a batch at a time.

faust delivers one event at a time through several asyncio hops and sends each response
with its own future; that caps a worker at a few thousand requests/s. Here one loop takes
whatever the consumer has, runs the same `Pipeline` calls on the whole batch, and hands the
records to librdkafka's producer. Where a model runs (fused and infer stages), admitted
requests go to the batcher's per-model queues (`pipeline.batching.scheduler.Scheduler`), and a batch
it flushes computes on the device while the loop consumes and decodes the next records.
Offsets are stored only once everything published for a consumed batch (and every one
before it) is delivered, so at-least-once holds across crashes.
"""

from __future__ import annotations

import functools
import logging
import signal
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_any
from typing import Any

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from pipeline.batching.scheduler import BatchPolicy, Flush, Scheduler
from pipeline.config import Settings
from pipeline.engines.flow import Backpressure
from pipeline.engines.offsets import ConsumedBatch, OffsetTracker
from pipeline.engines.topology import Stage, consumed_topics, downstream
from pipeline.engines.transactions import Transactions
from pipeline.kafka import (
    RecordRejected,
    consume_batch,
    consumer_config,
    produce,
    producer_config,
    record_error,
)
from pipeline.models import LoadedModel, ModelLoadError
from pipeline.serving import (
    Deferred,
    Job,
    Origin,
    Outcome,
    Pipeline,
    Publication,
    Record,
    Running,
)

log = logging.getLogger(__name__)
# Feature-source round trips in flight at once for requests the caches could not enrich.
ENRICH_THREADS = 4


class BatchEngine:
    """One stage (or the fused pipeline) as a consume-process-produce loop."""

    def __init__(self, settings: Settings, stage: Stage, pipeline: Pipeline) -> None:
        self.settings = settings
        self.stage = Stage(stage)
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
        interval_s = settings.transaction_interval_ms / 1000.0
        self.txn = (
            Transactions(self.producer, self.consumer, interval_s) if self.transactional else None
        )
        self._priority_hold = False
        # The assignment as the rebalance callbacks last gave it: Consumer.assignment() is a
        # round trip to librdkafka's group thread (~1 ms under load), too dear per batch.
        self._assignment: list[TopicPartition] = []
        # Records whose delivery report was an error, to produce again or replace (`_resend`).
        self._failed: list[tuple[ConsumedBatch, Origin, Record, bool, KafkaError]] = []
        after = downstream(settings, self.stage, pipeline.registry.names)
        self.backpressure = (
            Backpressure(settings, *after, pipeline.metrics.paused_partitions) if after else None
        )
        # Gateway and respond handle a consumed batch at once; fused and infer go through
        # the batcher (`_step`).
        self.process: Callable[[list[Origin]], list[Publication]] = (
            self._respond if self.stage == Stage.RESPOND else self._gateway
        )
        # Fused and infer stages batch per model (pipeline/batching/) and keep up to
        # max_batches_in_flight batches on the device while they consume the next records.
        # Each job's ``owner`` is the `ConsumedBatch` it was consumed in.
        self.scheduler: Scheduler[LoadedModel, Job] | None = None
        self.running: deque[tuple[Running, int]] = deque()
        if self.stage.computes:
            self.scheduler = Scheduler(self._policy, time.time, settings.max_inflight)
            if settings.preload_models:
                self._preload()
        # Fused: a request whose features only the cold source has waits for them on a
        # thread, not in the loop, so the requests behind it (and the device) do not wait.
        self._enricher: ThreadPoolExecutor | None = None
        self._enriching: list[tuple[Future[Any], Deferred, ConsumedBatch]] = []
        self._deferred = 0
        if self.stage == Stage.FUSED and pipeline.features is not None:
            self._enricher = ThreadPoolExecutor(ENRICH_THREADS, thread_name_prefix="sluice-enrich")

    def _policy(self, model: LoadedModel) -> BatchPolicy:
        s = self.settings
        policy = model.policy(s.max_delay_s, s.default_ttl_ms / 1000.0 or None)
        assert self.scheduler is not None
        for bucket, seconds in model.batch_time_s.items():  # measured at warm-up
            self.scheduler.observe(model, bucket, seconds)
        return policy

    def _preload(self) -> None:
        """Load (and warm up) every model now; one that fails is counted, the rest serve."""
        registry = self.pipeline.registry
        for name in registry.names:
            for version in registry.versions(name):
                try:
                    registry.resolve(name, version)
                except ModelLoadError as exc:
                    self.pipeline.metrics.model_load_failures.labels(name).inc()
                    log.error("%s", exc)

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
                if self.backpressure is not None:
                    self.backpressure.update(self.consumer)
                self._prioritize()
                if self.scheduler is not None:
                    self._step()
                    continue
                messages = self._next_batch(s.max_batch_size, s.max_delay_s)
                if messages:
                    self._handle(messages)
                elif self.txn is not None:
                    self._commit()  # idle: do not hold answers back
                self.producer.poll(0)
                self._resend()
                self.tracker.settle()
        finally:
            self._finish()

    # -- the batched infer path (fused and infer stages) -------------------------------------

    def _step(self) -> None:
        """Consume what is there, start the batches that are due, publish finished ones.

        A batch started here stays on the device while the next step consumes and decodes;
        that step collects it (or earlier, once it is done), so the device is fed while the
        CPU works.
        """
        sched = self.scheduler
        assert sched is not None
        room = sched.max_pending - sched.pending - self._deferred
        messages = []
        if room > 0:
            wait_s = 0.0 if self.running else self._wait_s()
            if self._enriching:
                wait_s = min(wait_s, 0.001)  # a fetch may finish any moment
            if sched.pending:
                # A batch is filling: librdkafka returns once it could be full, or when the
                # batcher's next flush is due.
                n = max(1, min(room, self.settings.max_batch_size - sched.pending))
                messages = self.consumer.consume(n, wait_s)
            else:  # nothing waits: return on the first record
                n = min(room, self.settings.max_batch_size)
                messages = consume_batch(self.consumer, n, wait_s)
        if messages:
            self._enqueue(messages)
        if self._enriching:
            if room <= 0 and not self.running:  # full, nothing to compute: wait for a fetch
                wait_any([f for f, _, _ in self._enriching], 0.005, FIRST_COMPLETED)
            self._admit_enriched()
        started = self._start_due()
        self._collect(keep=started)
        if self.txn is not None:
            idle = (
                not messages
                and not started
                and not self.running
                and not sched.pending
                and not self._enriching
            )
            if self.txn.due(idle):
                self._commit()
        self.producer.poll(0)
        if not self.transactional:
            self._resend()
            self.tracker.settle()

    def _wait_s(self) -> float:
        """How long the consumer may wait: until the batcher's next flush, at most 0.1 s."""
        assert self.scheduler is not None
        due = self.scheduler.next_deadline()
        if due is None:
            return 0.1
        return min(0.1, max(0.0, due - time.time()))

    def _enqueue(self, messages: list[Any]) -> None:
        origins, consumed = self._decode(messages)
        if not consumed:
            return
        batch = self.tracker.open(consumed)
        if self._enricher is None:
            self._schedule(self.pipeline.admit_many(origins), batch)
            return
        admitted, deferred = self.pipeline.admit_cached(origins)
        self._schedule(admitted, batch)
        if deferred is not None:
            # Held (offsets not stored) until admitted and answered.
            batch.held += deferred.count
            self._deferred += deferred.count
            future = self._enricher.submit(self.pipeline.fetch_features, deferred)
            self._enriching.append((future, deferred, batch))

    def _schedule(self, admitted: list[Job | Publication], batch: ConsumedBatch) -> None:
        """Publish the rejected records; hand the jobs to the batcher."""
        assert self.scheduler is not None
        jobs = [a for a in admitted if isinstance(a, Job)]
        self._publish([a for a in admitted if not isinstance(a, Job)], batch)
        batch.held += len(jobs)
        add = self.scheduler.add
        for job in jobs:
            job.owner = batch
            deadline_s = job.deadline_ms / 1000.0 if job.deadline_ms is not None else None
            add(job.model, job, deadline_s, job.origin.timestamp_ms / 1000.0)

    def _admit_enriched(self, wait: bool = False) -> None:
        """Admit the deferred requests whose features have come (all, waiting, with ``wait``)."""
        still: list[tuple[Future[Any], Deferred, ConsumedBatch]] = []
        for future, deferred, batch in self._enriching:
            if not (wait or future.done()):
                still.append((future, deferred, batch))
                continue
            admitted = self.pipeline.admit_fetched(deferred, future.result())
            self._deferred -= deferred.count
            batch.held -= deferred.count
            self._schedule(admitted, batch)
        self._enriching = still

    def _start_due(self, force: bool = False) -> int:
        """Start every batch the batcher says is due; returns how many were started."""
        sched = self.scheduler
        assert sched is not None
        started = 0
        while True:
            flush = sched.poll(force=force)
            if flush is None and sched.full:
                flush = sched.poll(force=True)  # at capacity: make room
            if flush is None:
                return started
            self._start(flush)
            started += bool(flush.items)
            # Bounded: the oldest batch is collected before another would exceed the limit.
            while len(self.running) > self.settings.max_batches_in_flight:
                self._collect_one()

    def _start(self, flush: Flush[LoadedModel, Job]) -> None:
        if flush.expired:
            self._answer(self.pipeline.expired_outcomes(flush.expired))
        if flush.items:
            self.running.append((self.pipeline.start(flush.items), flush.bucket))

    def _collect(self, keep: int = 0) -> None:
        """Publish finished batches, in order; leave the ``keep`` newest while they compute."""
        while self.running and (len(self.running) > keep or self.running[0][0].done()):
            self._collect_one()

    def _collect_one(self) -> None:
        running, bucket = self.running.popleft()
        outcomes = self.pipeline.finish(running)
        if running.pending is not None and self.scheduler is not None:
            self.scheduler.observe(running.jobs[0].model, bucket, running.pending.elapsed_s)
        self._answer(outcomes)

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
            self._send(records, owner[id(origin)], origin)
        for o in outcomes:  # answered: its offsets may be stored once delivered
            o.job.owner.held -= 1

    def _publish(self, publications: list[Publication], batch: ConsumedBatch) -> None:
        if self.txn is not None:
            self.txn.begin()  # a batch may finish after the last one was committed
        for origin, records in publications:
            self._send(records, batch, origin)

    def _send(
        self,
        records: list[Record],
        batch: ConsumedBatch | None,
        origin: Origin,
        replacing: bool = False,
    ) -> None:
        """Produce ``origin``'s records counted against ``batch`` (in the open transaction,
        exactly-once). A record the producer refuses for itself is replaced at once
        (`Pipeline.undeliverable`); ``replacing`` marks such replacements."""
        bp = self.backpressure
        for r in records:
            if bp is not None and r.topic in bp.downstream:
                bp.sent += 1  # counted before produce: an estimate errs on the high side
            try:
                if batch is None or self.transactional:
                    produce(self.producer, r.topic, r.value, r.key, r.headers)
                    continue
                batch.outstanding += 1
                report = functools.partial(self._delivered, batch, origin, r, replacing)
                try:
                    produce(self.producer, r.topic, r.value, r.key, r.headers, report)
                except RecordRejected:
                    batch.outstanding -= 1
                    raise
            except RecordRejected as exc:
                if bp is not None and r.topic in bp.downstream:
                    bp.delivered += 1  # never produced: no longer in flight
                self._send(self.pipeline.undeliverable(origin, r, exc.code, exc.message, replacing),
                           batch, origin, replacing=True)  # fmt: skip

    def _delivered(
        self,
        batch: ConsumedBatch,
        origin: Origin,
        record: Record,
        replacing: bool,
        err: KafkaError | None,
        _msg: Any,
    ) -> None:
        batch.outstanding -= 1
        bp = self.backpressure
        if bp is not None and record.topic in bp.downstream:
            bp.delivered += 1  # or failed: a record produced again counts as sent again
        if err is not None:
            batch.held += 1  # its offsets wait until the record is produced again or replaced
            self._failed.append((batch, origin, record, replacing, err))

    def _resend(self) -> None:
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
                    self._send([record], batch, origin, replacing)
                else:
                    replacements = self.pipeline.undeliverable(
                        origin, record, code, err.str(), replacing
                    )
                    self._send(replacements, batch, origin, replacing=True)

    def _drain(self) -> None:
        """Run and publish everything held (before partitions move, and at the end)."""
        if self.scheduler is None:
            return
        self._admit_enriched(wait=True)
        self._start_due(force=True)
        self._collect()

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

    def _decode(self, messages: list[Any]) -> tuple[list[Origin], list[Any]]:
        """The records' origins, and the messages they came from (consumer errors left out)."""
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
        return origins, consumed

    def _handle(self, messages: list[Any]) -> None:
        origins, consumed = self._decode(messages)
        if not consumed:
            return
        if self.transactional:
            self._handle_transaction(consumed, origins)
            return
        batch = self.tracker.open(consumed)
        for origin, records in self.process(origins):
            self._send(records, batch, origin)  # not transactional here (handled above)

    def _handle_transaction(self, consumed: list[Any], origins: list[Origin]) -> None:
        """Gateway and respond stages under exactly-once: a consumed batch's records and
        offsets go into the open transaction. Any failure ends the process after an abort."""
        assert self.txn is not None
        self.txn.begin()
        try:
            for origin, records in self.process(origins):
                self._send(records, None, origin)
            self.txn.add({(m.topic(), m.partition()): m.offset() for m in consumed})
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
        if self.backpressure is not None:  # committed: delivered downstream
            self.backpressure.delivered = self.backpressure.sent

    def _prioritize(self) -> None:
        """Serve the priority topic first: while it has a backlog, the rest waits in Kafka.

        Reads only librdkafka's cached high watermarks and positions (no broker round trip).
        """
        if not self.stage.admits:
            return
        if self.backpressure is not None and self.backpressure.paused:
            self._priority_hold = False  # all paused; resuming resumes all
            return
        priority = self.settings.priority_topic
        assignment = self._assignment
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
        self._assignment = list(partitions)
        self._feature_tables(partitions, assigned=True)
        if self.backpressure is not None and self.backpressure.paused:
            consumer.pause(partitions)
        elif self._priority_hold:
            consumer.pause([tp for tp in partitions if tp.topic != self.settings.priority_topic])

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
        self._assignment = []
        self._admit_enriched(wait=True)  # their fetches fill the tables about to close
        self._feature_tables(partitions, assigned=False)
        self._drain()  # answer what the batcher holds before the partitions move
        if self.txn is not None:
            self._commit()  # before the partitions move to another worker
            return
        # Publish and store what was consumed before the partitions move to another worker.
        self._flush()
        self.tracker.settle()
        try:
            consumer.commit(asynchronous=False)
        except Exception as exc:  # noqa: BLE001 - nothing stored yet is fine
            log.debug("commit on revoke: %s", exc)

    def _flush(self, timeout_s: float = 30.0) -> int:
        """Deliver everything produced, failed deliveries included (produced again or
        replaced); returns how many records are still undelivered after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        remaining = self.producer.flush(timeout_s)
        while self._failed and time.monotonic() < deadline:
            self._resend()
            remaining = self.producer.flush(max(0.0, deadline - time.monotonic()))
        return remaining + len(self._failed)

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
        remaining = self.producer.flush(30) if self.transactional else self._flush()
        if remaining == 0 and not self.transactional:
            try:
                self.tracker.settle()
                self.consumer.commit(asynchronous=False)
            except Exception as exc:  # noqa: BLE001
                log.debug("final commit: %s", exc)
        if self._enricher is not None:
            self._enricher.shutdown(wait=False)
        self.consumer.close()


def install_signal_handlers(engine: BatchEngine) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: engine.stop())
