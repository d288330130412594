"""The fused and infer stages' device side: requests batched per model (`Scheduler`), up to
``max_batches_in_flight`` batches on the device while the loop consumes and decodes the next
records, and (fused, with features) requests waiting for their features off the loop.

The engine hands it admitted records (`Compute.admit`) and calls `Compute.advance` on every
turn; finished batches come back through the ``answer`` callback, rejections through
``reject``. Each job's ``owner`` is the `ConsumedBatch` it was consumed in, held until the
job is answered.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from itertools import islice

from pipeline.batching.scheduler import BatchPolicy, Flush, Scheduler
from pipeline.config import Settings
from pipeline.engines.enrichment import Enricher
from pipeline.engines.offsets import ConsumedBatch
from pipeline.models import LoadedModel, ModelLoadError
from pipeline.serving import Job, Origin, Outcome, Pipeline, Publication, Running

log = logging.getLogger(__name__)


class Compute:
    """Batches of admitted requests on their way through the device."""

    def __init__(
        self,
        settings: Settings,
        pipeline: Pipeline,
        with_enricher: bool,
        answer: Callable[[list[Outcome]], None],
        reject: Callable[[list[Publication], ConsumedBatch], None],
    ) -> None:
        self.settings = settings
        self.pipeline = pipeline
        self.answer = answer
        self.reject = reject
        self.scheduler: Scheduler[LoadedModel, Job] = Scheduler(
            self._policy, time.time, settings.max_inflight
        )
        self.running: deque[tuple[Running, int]] = deque()
        self.enricher = Enricher(pipeline) if with_enricher else None
        if settings.preload_models:
            self._preload()

    @property
    def room(self) -> int:
        """How many more requests may be taken in: the rest waits in Kafka."""
        deferred = self.enricher.deferred if self.enricher is not None else 0
        return self.scheduler.max_pending - self.scheduler.pending - deferred

    @property
    def busy(self) -> bool:
        """Whether anything is queued, fetching or on the device."""
        return bool(self.running or self.scheduler.pending or self.enricher)

    def wait_s(self) -> float:
        """How long the consumer may wait for records: not at all while a batch computes on
        the device (2 ms while batches are only being prepared on the preparation thread:
        a loop that spun there would take a core from them; 0.5 ms while images decode on
        torch's threads), else until the batcher's next flush (at most 0.1 s; 1 ms while a
        fetch is out)."""
        if self.running:
            if any(r.started is None for r, _ in self.running):
                return 0.0
            # Images decoding on torch's threads: the loop looks again soon (it holds
            # nothing they need), the preparation thread is left its core.
            return 0.0005 if self.running[-1][0].forked else 0.002
        due = self.scheduler.next_deadline()
        wait_s = 0.1 if due is None else min(0.1, max(0.0, due - time.time()))
        return min(wait_s, 0.001) if self.enricher else wait_s

    def admit(self, origins: list[Origin], batch: ConsumedBatch) -> None:
        """Admit consumed records: jobs to the batcher, rejections published, requests whose
        features only the cold source has fetched on a thread."""
        if self.enricher is None:
            self._schedule(self.pipeline.admit_many(origins), batch)
            return
        admitted, deferred = self.pipeline.admit_cached(origins)
        self._schedule(admitted, batch)
        if deferred is not None:
            self.enricher.defer(deferred, batch)

    def advance(self, room: int) -> int:
        """Admit what fetches brought, start the batches that are due, answer finished ones;
        returns how many batches were started. A batch started here stays on the device
        while the loop consumes; the next turn collects it (or this one, once it is done)."""
        if self.enricher:
            if room <= 0 and not self.running:  # full, nothing to compute: wait for a fetch
                self.enricher.wait(0.005)
            self.admit_fetched()
        started = self._start_due()
        self._collect(keep=started, drain=False)
        return started

    def drain(self) -> None:
        """Run and answer everything held (before partitions move, and at the end)."""
        self.admit_fetched(wait=True)
        self._start_due(force=True)
        self._collect()

    def close(self) -> None:
        if self.enricher is not None:
            self.enricher.close()

    def _policy(self, model: LoadedModel) -> BatchPolicy:
        s = self.settings
        policy = model.policy(
            s.max_delay_s, s.default_ttl_ms / 1000.0 or None, s.batch_window == "adaptive"
        )
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

    def _schedule(self, admitted: list[Job | Publication], batch: ConsumedBatch) -> None:
        """Publish the rejected records; hand the jobs to the batcher."""
        jobs = [a for a in admitted if isinstance(a, Job)]
        jobs += [j.mirror for j in jobs if j.mirror is not None]  # experiments' shadows
        self.reject([a for a in admitted if not isinstance(a, Job)], batch)
        batch.held += len(jobs)
        add = self.scheduler.add
        for job in jobs:
            job.owner = batch
            deadline_s = job.deadline_ms / 1000.0 if job.deadline_ms is not None else None
            add(job.model, job, deadline_s, job.origin.timestamp_ms / 1000.0)

    def admit_fetched(self, wait: bool = False) -> None:
        """Admit the deferred requests whose features have come (all, waiting, with ``wait``)."""
        if self.enricher is not None:
            for admitted, batch in self.enricher.ready(wait):
                self._schedule(admitted, batch)

    def _idle(self, model: LoadedModel) -> bool:
        """No batch of ``model`` started and not yet collected, but those whose forked
        preparation is done: the next decodes while they compute (a few at most to look at)."""
        return all(r.jobs[0].model is not model or r.prepared() for r, _ in self.running)

    def _start_due(self, force: bool = False) -> int:
        """Start every batch the batcher says is due; returns how many were started."""
        sched = self.scheduler
        started = 0
        while True:
            flush = sched.poll(force=force, idle=self._idle)
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
            self.answer(self.pipeline.expired_outcomes(flush.expired))
        if flush.items:
            self.running.append((self.pipeline.start(flush.items), flush.bucket))

    def _collect(self, keep: int = 0, drain: bool = True) -> None:
        """Answer finished batches, in order; leave the ``keep`` newest while they compute
        (and, unless ``drain``, those still decoding: the loop consumes meanwhile and starts
        the next batch once they have decoded, rather than wait for them to compute)."""
        self._submit_prepared()
        decoding = 0
        for running, _ in reversed(self.running):
            if drain or not (running.forked and running.started is not None):
                break
            decoding += 1
        keep = max(keep, decoding)
        while self.running and (len(self.running) > keep or self.running[0][0].done()):
            self._collect_one()

    def _submit_prepared(self) -> None:
        """Submit, in order, the batches whose forked preparation is done."""
        for running, _ in self.running:
            if running.started is not None:
                if not (running.forked and running.started.done()):
                    return
                running.settle()

    def _collect_one(self) -> None:
        oldest = self.running[0][0]
        if any(r.forked and r.started is not None for r, _ in islice(self.running, 1, None)):
            # A later batch is decoding: send it to the device as soon as it has, rather
            # than after the oldest is answered, so that the model does not wait for the
            # loop between them.
            while not oldest.done():
                time.sleep(0.0002)
                self._submit_prepared()
        running, bucket = self.running.popleft()
        model = running.jobs[0].model
        outcomes = self.pipeline.finish(running)
        if running.pending is not None:
            self.scheduler.observe(model, bucket, running.pending.elapsed_s)
        self.answer(outcomes)
