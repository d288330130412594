"""The pipeline's three stages as library calls: gateway, infer, respond.

Agents (``agents/``) feed records in and provide a `Sink` to publish to; everything here is
testable without Kafka. Errors never escape as exceptions: a request that cannot be served
ends as a DLQ record with a reason and, where the requester can be answered, an ``error`` or
``expired`` response.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from pipeline.config import Settings
from pipeline.kafka.client import record_error
from pipeline.models import LoadedModel, ModelLoadError, ModelRegistry
from pipeline.models.runtime import Pending
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.protocol.codec import RequestError, Response, Tensor

if TYPE_CHECKING:
    from pipeline.features.store import FeatureStore
    from pipeline.serving.result_cache import ResultCache

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
ORIGIN_HEADER = "sluice-origin"
# The prefetcher learns key sequences per session: this header names it (else: partition).
SESSION_HEADER = "session-id"


class Sink(Protocol):
    """Publishes one record; the returned awaitable resolves when the broker has it."""

    async def __call__(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None
    ) -> Awaitable[Any]: ...


@dataclass(slots=True)
class Origin:
    """The Kafka record a request came from: for the DLQ, deadlines and acking."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: float
    value: bytes | None
    headers: Headers = field(default_factory=list)
    ack: Callable[[], Any] | None = None

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def correlation_headers(self) -> Headers:
        return [(k, v) for k, v in self.headers if k in codec.CORRELATION_HEADERS]


@dataclass(slots=True)
class Job:
    """An admitted request on its way through a model."""

    request: codec.Request
    model: LoadedModel
    arrays: list[np.ndarray]
    deadline_ms: float | None
    origin: Origin
    received_ms: float
    started_ms: float = 0.0
    # The result cache's key for this request's inputs, when the cache is on.
    result_key: str | None = None
    # The engine's bookkeeping for the consumed batch this job came in (offsets to store).
    owner: Any = None


@dataclass(slots=True)
class Outcome:
    """What became of one job in a batch: outputs (one row per model output) or an error.

    ``batch_outputs`` and ``row`` point into the whole batch's outputs, so that responses
    for a batch can be postprocessed at once.
    """

    job: Job
    outputs: list[np.ndarray] | None = None
    error: RequestError | None = None
    inference_ms: float = 0.0
    batch_size: int = 0
    batch_outputs: list[np.ndarray] | None = None
    row: int = 0


@dataclass(slots=True)
class Record:
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None


@dataclass(slots=True)
class Running:
    """One model's batch submitted to the device (``pending`` None: it failed to start)."""

    jobs: list[Job]
    pending: Pending | None

    def done(self) -> bool:
        """True once `Pipeline.finish` will not wait for the device."""
        return self.pending is None or self.pending.ready()


# Records to publish for one source record; the source is acked once all are delivered.
Publication = tuple[Origin, list[Record]]


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass(slots=True)
class Deferred:
    """The requests of a consumed batch whose features only the cold source has, waiting for
    one round trip for ``misses`` (key -> partition); ``waiting`` holds, per request, its
    index in ``origins``, model and error context, and its feature-store entry."""

    origins: Sequence[Origin]
    waiting: list[tuple[tuple[int, LoadedModel, dict[str, Any]], Any]]
    misses: dict[str, int]

    @property
    def count(self) -> int:
        return len(self.waiting)


class Pipeline:
    """Gateway, infer and respond logic shared by every engine and mode.

    The core is synchronous and returns the records to publish (`Publication`s); the async
    methods publish them through ``sink`` and ack each source record once everything
    published for it is delivered (the faust agents use those). The batch engine publishes
    the same records with its own producer.
    """

    def __init__(
        self, settings: Settings, registry: ModelRegistry, sink: Sink | None, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        # Models loaded from here on batch up to the settings' size unless their config says.
        registry.max_batch_size = settings.max_batch_size
        self._acks: set[asyncio.Task[None]] = set()
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}
        # Feature enrichment and the result cache (pipeline/features), when configured.
        self.features: FeatureStore | None = None
        self.results: ResultCache | None = None
        if settings.feature_source:
            from pipeline.features.store import FeatureStore

            self.features = FeatureStore.from_settings(settings, metrics).start()
        if settings.result_cache_enabled:
            from pipeline.serving.result_cache import ResultCache

            self.results = ResultCache.from_settings(settings, metrics)

    def close(self) -> None:
        """Stop the prefetcher and close the caches' stores."""
        if self.features is not None:
            self.features.close()
        if self.results is not None:
            self.results.close()

    # -- gateway --------------------------------------------------------------------------

    def admit(self, origin: Origin) -> Job:
        """Decode, validate, resolve the model and check the deadline; raise `RequestError`."""
        request, model, context = self._resolve(origin)
        if self.features is not None:
            entry = self._feature_entry(origin, request, model)
            request = self._enriched(self.features.enrich_many([entry])[0], context)
        return self._job(origin, request, model, context)

    def _resolve(self, origin: Origin) -> tuple[codec.Request, LoadedModel, dict[str, Any]]:
        """Decode and validate the request and resolve its model (`RequestError` if not)."""
        fmt = codec.content_type(origin.headers)
        request = codec.decode_request(origin.value, self.settings.max_payload_bytes, fmt)
        context: dict[str, Any] = {
            "request_id": request.id,
            "model": request.model,
            "version": request.version,
            "reply_to": request.reply_to,
        }
        if request.reply_to is not None and not self.settings.reply_to_allowed(request.reply_to):
            # A message never chooses where the worker writes: answered on the default topic.
            context["reply_to"] = None
            raise RequestError(
                codec.SCHEMA,
                f"reply_to {request.reply_to!r} is not an allowed reply topic "
                f"(SLUICE_REPLY_TO_TOPICS={self.settings.reply_to_topics!r})",
                **context,
            )
        try:
            model = self.registry.resolve(request.model, request.version)
        except RequestError as exc:
            raise RequestError(exc.code, exc.message, **context) from None
        except ModelLoadError as exc:
            self.metrics.model_load_failures.labels(request.model).inc()
            raise RequestError(codec.MODEL_ERROR, str(exc), **context) from None
        context["version"] = model.version
        return request, model, context

    def _feature_entry(
        self, origin: Origin, request: codec.Request, model: LoadedModel
    ) -> tuple[codec.Request, LoadedModel, int, str]:
        session = origin.header(SESSION_HEADER)
        # The L2 table is partitioned like the requests topic (-1: no table, L1 only).
        table = origin.partition if origin.topic == self.settings.requests_topic else -1
        name = session.decode(errors="replace") if session else f"p{origin.partition}"
        return request, model, table, name

    @staticmethod
    def _enriched(result: codec.Request | RequestError, context: dict[str, Any]) -> codec.Request:
        if isinstance(result, RequestError):
            raise RequestError(result.code, result.message, **context) from None
        return result

    def _job(
        self, origin: Origin, request: codec.Request, model: LoadedModel, context: dict[str, Any]
    ) -> Job:
        try:
            arrays = model.inputs_from_request(
                request.inputs, self.settings.max_elements_per_tensor, flat=True
            )
        except RequestError as exc:
            raise RequestError(exc.code, exc.message, **context) from None
        deadline = _deadline_ms(request, origin.timestamp_ms, self.settings.default_ttl_ms)
        job = Job(request, model, arrays, deadline, origin, now_ms())
        if deadline is not None and job.received_ms >= deadline:
            raise RequestError(
                codec.EXPIRED, "deadline passed before the request was admitted", **context
            )
        self.metrics.inflight.inc()
        return job

    def admit_or_reject(self, origin: Origin) -> Job | Publication:
        """A `Job`, or the DLQ record (and answer) for a record that cannot be served."""
        try:
            job = self.admit(origin)
            if self.results is not None:
                return self.cached_response(job) or job
            return job
        except Exception as exc:  # noqa: BLE001 - a record must never stop the worker
            return self._rejected(origin, exc)

    def admit_many(self, origins: Sequence[Origin]) -> list[Job | Publication]:
        """`admit_or_reject` for a consumed batch, in order. The batch's feature-store misses
        share one source round trip, so a batch waits for the cold source once, not once
        per miss. (The batch engine does not wait at all: `admit_cached`.)"""
        if self.features is None or len(origins) < 2:
            return [self.admit_or_reject(o) for o in origins]
        admitted, deferred = self._admit_cached(origins)
        if deferred is not None:
            admitted.update(self._admit_fetched(deferred, self.fetch_features(deferred)))
        return [admitted[i] for i in sorted(admitted)]

    def admit_cached(
        self, origins: Sequence[Origin]
    ) -> tuple[list[Job | Publication], Deferred | None]:
        """`admit_many` without waiting for the feature source: the requests whose features
        only the source has come back in a `Deferred`, to admit with `admit_fetched` once
        `fetch_features` (on another thread, say) has them."""
        if self.features is None:
            return [self.admit_or_reject(o) for o in origins], None
        admitted, deferred = self._admit_cached(origins)
        return [admitted[i] for i in sorted(admitted)], deferred

    def fetch_features(self, deferred: Deferred) -> dict[str, bytes | None] | Exception:
        """One source round trip for a `Deferred`'s keys (or the exception it failed with)."""
        assert self.features is not None
        try:
            return self.features.fetch(deferred.misses)
        except Exception as exc:  # noqa: BLE001 - e.g. the source is down: each one fails
            return exc

    def admit_fetched(
        self, deferred: Deferred, fetched: Mapping[str, bytes | None] | Exception
    ) -> list[Job | Publication]:
        admitted = self._admit_fetched(deferred, fetched)
        return [admitted[i] for i in sorted(admitted)]

    def _admit_cached(
        self, origins: Sequence[Origin]
    ) -> tuple[dict[int, Job | Publication], Deferred | None]:
        assert self.features is not None
        out: dict[int, Job | Publication] = {}
        resolved: list[tuple[int, codec.Request, LoadedModel, dict[str, Any]]] = []
        for i, origin in enumerate(origins):
            try:
                resolved.append((i, *self._resolve(origin)))
            except Exception as exc:  # noqa: BLE001 - a record must never stop the worker
                out[i] = self._rejected(origin, exc)
        entries = [self._feature_entry(origins[i], r, m) for i, r, m, _ in resolved]
        enriched: list[codec.Request | RequestError | Exception | None]
        misses: dict[str, int] = {}
        try:
            found, misses = self.features.enrich_cached(entries)
            enriched = list(found)
        except Exception as exc:  # noqa: BLE001 - e.g. a store failed: each one fails
            enriched = [exc] * len(resolved)
        waiting = []
        for (i, _, model, context), entry, result in zip(resolved, entries, enriched, strict=True):
            if result is None:
                waiting.append(((i, model, context), entry))
            else:
                out[i] = self._admitted(origins[i], result, model, context)
        return out, (Deferred(origins, waiting, misses) if waiting else None)

    def _admit_fetched(
        self, deferred: Deferred, fetched: Mapping[str, bytes | None] | Exception
    ) -> dict[int, Job | Publication]:
        assert self.features is not None
        entries = [entry for _, entry in deferred.waiting]
        pending: list[codec.Request | RequestError | None] = [None] * len(entries)
        enriched = (
            self.features.enrich_failed(pending, fetched)
            if isinstance(fetched, Exception)
            else self.features.enrich_fetched(entries, pending, fetched)
        )
        out: dict[int, Job | Publication] = {}
        for ((i, model, context), _), result in zip(deferred.waiting, enriched, strict=True):
            out[i] = self._admitted(deferred.origins[i], result, model, context)
        return out

    def _admitted(
        self,
        origin: Origin,
        result: codec.Request | Exception,
        model: LoadedModel,
        context: dict[str, Any],
    ) -> Job | Publication:
        """A job for an enriched request (or its answer from the result cache), or the
        records that reject it."""
        try:
            if isinstance(result, Exception) and not isinstance(result, RequestError):
                raise result
            job = self._job(origin, self._enriched(result, context), model, context)
            return (self.cached_response(job) or job) if self.results is not None else job
        except Exception as exc:  # noqa: BLE001 - a record must never stop the worker
            return self._rejected(origin, exc)

    def _rejected(self, origin: Origin, exc: Exception) -> Publication:
        if isinstance(exc, RequestError):
            return origin, self.reject_records(origin, exc, "gateway")
        log.error(
            "unexpected error admitting %s:%s:%s", origin.topic, origin.partition, origin.offset,
            exc_info=exc,
        )  # fmt: skip
        error = RequestError(codec.MALFORMED, f"{type(exc).__name__}: {exc}")
        return origin, self.reject_records(origin, error, "gateway")

    def forward_record(self, job: Job) -> Publication:
        """Split mode: the admitted request, unchanged, on its model's infer topic."""
        o = job.origin
        assert o.value is not None
        self.metrics.inflight.dec()
        headers = [*o.headers, (ORIGIN_HEADER, f"{o.topic}:{o.partition}:{o.offset}".encode())]
        key = (job.request.key or job.request.id).encode()
        return o, [Record(self.settings.infer_topic(job.model.name), key, o.value, headers)]

    # -- infer ----------------------------------------------------------------------------

    def infer(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Run a batch of jobs; expired jobs are answered without computing.

        Jobs for different model versions run as separate batches. A batch that raises is
        bisected, so a poison request fails alone.
        """
        outcomes: list[Outcome] = []
        live: dict[LoadedModel, list[Job]] = {}
        t = now_ms()
        for job in jobs:
            job.started_ms = t
            if job.deadline_ms is not None and t >= job.deadline_ms:
                outcomes.extend(self.expired_outcomes([job]))
            else:
                live.setdefault(job.model, []).append(job)
        for model, model_jobs in live.items():
            step = min(model.max_batch_size, model.batch_buckets[-1])
            for i in range(0, len(model_jobs), step):
                outcomes.extend(self._run_bisect(model_jobs[i : i + step]))
        return outcomes

    def expired_outcomes(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Jobs whose deadline passed while queued: answered ``expired``, never computed."""
        t = now_ms()
        outcomes = []
        for job in jobs:
            job.started_ms = t
            error = RequestError(
                codec.EXPIRED, "deadline passed while queued for a batch",
                job.request.id, job.model.name, job.model.version, job.request.reply_to,
            )  # fmt: skip
            outcomes.append(Outcome(job, error=error))
        return outcomes

    def start(self, jobs: list[Job]) -> Running:
        """Stack one model's jobs into pooled buffers and submit them to the device.

        Returns at once on CUDA (the engine decodes the next records meanwhile); `finish`
        collects the outcomes. A failure here is kept for `finish`, which bisects.
        """
        t = now_ms()
        for job in jobs:
            job.started_ms = t
        model = jobs[0].model
        batch = None
        try:
            batch = model.stack_inputs([j.arrays for j in jobs])
            return Running(jobs, model.submit(batch))
        except Exception:  # noqa: BLE001 - finish() runs it again, bisected
            if batch is not None:
                batch.release()
            return Running(jobs, None)

    def finish(self, running: Running) -> list[Outcome]:
        """Outcomes of a started batch; one that failed runs again bisected, with retries."""
        if running.pending is not None:
            try:
                outputs = running.pending.result()
            except Exception:  # noqa: BLE001 - bisected below
                log.debug("batch of %d failed; bisecting", len(running.jobs), exc_info=True)
            else:
                return self._outcomes(running.jobs, outputs, running.pending.elapsed_s)
        return self._run_bisect(running.jobs)

    def _run_bisect(self, jobs: list[Job]) -> list[Outcome]:
        model = jobs[0].model
        t0 = time.perf_counter()
        attempts = 1
        batch = None
        try:
            batch = model.stack_inputs([j.arrays for j in jobs])
            while True:
                try:
                    outputs = model.run(batch)
                    break
                except Exception as exc:
                    if attempts >= self.settings.max_attempts or not is_transient(exc):
                        raise
                    # Exponential backoff with jitter, so retries from workers sharing a
                    # device do not fall into step.
                    base_s = self.settings.retry_backoff_ms / 1000.0 * 2 ** (attempts - 1)
                    time.sleep(base_s * random.uniform(0.5, 1.5))
                    attempts += 1
        except Exception as exc:  # noqa: BLE001 - any model failure is the request's error
            if len(jobs) > 1:
                mid = len(jobs) // 2
                return self._run_bisect(jobs[:mid]) + self._run_bisect(jobs[mid:])
            job = jobs[0]
            code, message = (
                (exc.code, exc.message) if isinstance(exc, RequestError)
                else (codec.MODEL_ERROR, f"{type(exc).__name__}: {exc}")
            )  # fmt: skip
            error = RequestError(
                code, message, job.request.id, model.name, model.version,
                job.request.reply_to, attempts,
            )  # fmt: skip
            return [Outcome(job, error=error)]
        finally:
            if batch is not None:
                batch.release()
        return self._outcomes(jobs, outputs, time.perf_counter() - t0)

    def _outcomes(
        self, jobs: list[Job], outputs: list[np.ndarray], elapsed_s: float
    ) -> list[Outcome]:
        model = jobs[0].model
        self.metrics.batch_size.labels(model.name).observe(len(jobs))
        self.metrics.inference.labels(model.name).observe(elapsed_s)
        # Per-stage latency from the produce timestamp: admitted (gateway), computed (infer);
        # the respond stage's is observed with each response.
        produced = np.fromiter((j.origin.timestamp_ms for j in jobs), np.float64, len(jobs))
        admitted = np.fromiter((j.received_ms for j in jobs), np.float64, len(jobs))
        latency = self.metrics.request_latency
        latency.labels(model.name, model.version, "gateway").observe_many(
            np.maximum(admitted - produced, 0.0) / 1000.0
        )
        latency.labels(model.name, model.version, "infer").observe_many(
            np.maximum(now_ms() - produced, 0.0) / 1000.0
        )
        ms, n = elapsed_s * 1000, len(jobs)
        return [
            Outcome(job, [o[i] for o in outputs], None, ms, n, outputs, i)
            for i, job in enumerate(jobs)
        ]

    # -- respond --------------------------------------------------------------------------

    def response_records(self, outcomes: Sequence[Outcome], stage: str) -> list[Publication]:
        """Fused mode: each outcome's response (errors: DLQ record and error response)."""
        publications: list[Publication] = []
        for group in _groups(outcomes):
            if group[0].error is not None:
                for o in group:
                    self.metrics.inflight.dec()
                    assert o.error is not None
                    publications.append(
                        (o.job.origin, self.reject_records(o.job.origin, o.error, stage))
                    )
                continue
            self.metrics.inflight.dec(len(group))
            model = group[0].job.model
            metas = [self._result(o) for o in group]
            outputs = _rows(group)
            values = self._responses(model.name, model.version, outputs, metas)
            if self.results is not None:
                for i, o in enumerate(group):
                    self._fill_result(o.job, [out[i] for out in outputs])
            for o, meta, value in zip(group, metas, values, strict=True):
                origin = o.job.origin
                topic = meta.reply_to or self.settings.responses_topic
                record = Record(topic, meta.id.encode(), value, origin.correlation_headers())
                publications.append((origin, [record]))
        return publications

    def result_records(self, outcomes: Sequence[Outcome]) -> list[Publication]:
        """Split mode, infer stage: raw outputs for the results topic."""
        publications: list[Publication] = []
        for o in outcomes:
            job, origin = o.job, o.job.origin
            self.metrics.inflight.dec()
            if o.error is not None:
                publications.append((origin, self.reject_records(origin, o.error, "infer")))
                continue
            assert o.outputs is not None
            result = self._result(o)
            if self.results is not None:
                self._fill_result(job, o.outputs)
            result.outputs = [
                codec.array_to_tensor(spec.name, out)
                for spec, out in zip(job.model.config.outputs, o.outputs, strict=False)
            ]
            headers = [
                *origin.correlation_headers(),
                (ORIGIN_HEADER, f"{origin.topic}:{origin.partition}:{origin.offset}".encode()),
            ]
            key = job.request.id.encode()
            record = Record(self.settings.results_topic, key, codec.encode(result), headers)
            publications.append((origin, [record]))
        return publications

    def respond_result_records(self, origin: Origin) -> Publication:
        """Split mode, respond stage: postprocess one results-topic record into a response."""
        try:
            result = codec.decode_result(origin.value or b"")
            arrays = [codec.tensor_to_array(t, 1 << 62)[None] for t in result.outputs]
        except (RequestError, ValueError) as exc:
            error = (
                exc if isinstance(exc, RequestError) else RequestError(codec.MALFORMED, str(exc))
            )
            return origin, self.reject_records(origin, error, "respond")
        try:
            [value] = self._responses(result.model, result.model_version, arrays, [result])
        except RequestError as exc:
            # e.g. a version this process does not know (the infer stage served it).
            error = RequestError(
                exc.code, exc.message, result.id, result.model, result.model_version,
                result.reply_to,
            )  # fmt: skip
            return origin, self.reject_records(origin, error, "respond")
        topic = result.reply_to or self.settings.responses_topic
        return origin, [Record(topic, result.id.encode(), value, origin.correlation_headers())]

    def _result(self, outcome: Outcome) -> codec.ResultRecord:
        job = outcome.job
        params = job.request.parameters
        return codec.ResultRecord(
            id=job.request.id,
            model=job.model.name,
            model_version=job.model.version,
            outputs=[],
            reply_to=job.request.reply_to,
            top_k=params.top_k if params is not None else None,
            fmt=codec.content_type(job.origin.headers),
            produced_ms=job.origin.timestamp_ms,
            received_ms=job.received_ms,
            started_ms=job.started_ms,
            inference_ms=outcome.inference_ms,
            batch_size=outcome.batch_size,
        )

    def _responses(
        self, model: str, version: str, outputs: list[np.ndarray], metas: list[codec.ResultRecord]
    ) -> list[bytes]:
        """Encoded ok responses for a batch: ``outputs[k]`` holds output k for every row."""
        config = self.registry.config(model, version)
        n = len(metas)
        binary = [m.fmt == codec.MSGPACK for m in metas]
        raw = []
        for spec, out in zip(config.outputs, outputs, strict=False):
            flat = out.reshape(n, -1)
            # Lists for JSON, little-endian bytes for MessagePack: each made once per batch.
            lists = flat.tolist() if not all(binary) else None
            le = np.ascontiguousarray(flat, flat.dtype.newbyteorder("<")) if any(binary) else None
            raw.append(
                (spec.name, codec.DATATYPE_OF[out.dtype.name], list(out.shape[1:]), lists, le)
            )
        top = _top_k(config.labels, outputs, [m.top_k or 1 for m in metas])
        done = now_ms()
        values = []
        for i, meta in enumerate(metas):
            tensors = [
                Tensor(name, dt, shape, le[i].tobytes() if binary[i] else lists[i])  # type: ignore[index]
                for name, dt, shape, lists, le in raw
            ]
            if top is not None:
                labels, scores = top[i]
                k = len(labels)
                tensors.append(Tensor("labels", "BYTES", [k], labels))
                tensors.append(Tensor("scores", "FP32", [k], scores))
            response = Response(
                id=meta.id,
                status="ok",
                model=model,
                model_version=version,
                outputs=tensors,
                timings=codec.Timings(
                    queue_ms=round(meta.started_ms - meta.received_ms, 3),
                    inference_ms=round(meta.inference_ms, 3),
                    total_ms=round(done - meta.produced_ms, 3),
                    batch_size=meta.batch_size,
                ),
            )
            values.append(codec.encode(response, meta.fmt))
        self._count_many(model, version, "ok", [m.produced_ms for m in metas])
        return values

    # -- the result cache -----------------------------------------------------------------

    def cached_response(self, job: Job) -> Publication | None:
        """Answer an admitted job from the result cache, without the model; None on a miss."""
        assert self.results is not None
        model, request = job.model, job.request
        job.result_key = self.results.key(model.name, model.version, request.inputs)
        rows = self.results.get(job.result_key, model.name, model.version)
        if rows is None:
            return None
        self.metrics.inflight.dec()
        origin = job.origin
        fmt = codec.content_type(origin.headers)
        tensors = [codec.array_to_tensor(n, a, fmt == codec.MSGPACK) for n, a in rows]
        params = request.parameters
        tensors += postprocess(
            model.config.labels, [a for _, a in rows], params.top_k if params else None
        )
        done = now_ms()
        response = Response(
            id=request.id, status="ok", model=model.name, model_version=model.version,
            outputs=tensors,
            timings=codec.Timings(queue_ms=0.0, inference_ms=0.0,
                                  total_ms=round(done - origin.timestamp_ms, 3), batch_size=0),
        )  # fmt: skip
        topic = request.reply_to or self.settings.responses_topic
        record = Record(topic, request.id.encode(), codec.encode(response, fmt),
                        origin.correlation_headers())  # fmt: skip
        self._count(model.name, model.version, "ok", origin.timestamp_ms)
        return origin, [record]

    def _fill_result(self, job: Job, rows: list[np.ndarray]) -> None:
        if self.results is None or job.result_key is None:
            return
        names = [spec.name for spec in job.model.config.outputs]
        self.results.put(
            job.result_key, job.model.name, job.model.version,
            list(zip(names, rows, strict=False)),
        )  # fmt: skip

    # -- errors ---------------------------------------------------------------------------

    def reject_records(self, origin: Origin, error: RequestError, stage: str) -> list[Record]:
        """The DLQ record for a failed request and, when it can be identified, its answer."""
        dlq_value = codec.dlq_record(
            origin.value, origin.topic, origin.partition, origin.offset, stage, error,
            error.attempts, self.settings.max_record_bytes,
        )  # fmt: skip
        key = error.request_id.encode() if error.request_id else None
        headers = origin.correlation_headers()
        dlq_headers = [(k, v) for k, v in headers if k != codec.CONTENT_TYPE_HEADER]
        records = [Record(self.settings.dlq_topic, key, dlq_value, dlq_headers)]
        self.metrics.dlq.labels(error.code).inc()
        if error.request_id is not None:
            status = "expired" if error.code == codec.EXPIRED else "error"
            response = Response(
                id=error.request_id,
                status=status,
                model=error.model,
                model_version=error.version,
                error=codec.ErrorInfo(error.code, error.message),
            )
            reply_to = error.reply_to
            if reply_to is None or not self.settings.reply_to_allowed(reply_to):
                reply_to = self.settings.responses_topic  # salvaged from a bad request: checked
            topic = reply_to
            fmt = codec.content_type(headers)
            records.append(Record(topic, key, codec.encode(response, fmt), headers))
        outcome = "expired" if error.code == codec.EXPIRED else "error"
        # Label values must stay bounded: only models and versions that exist on disk.
        known = error.model is not None and error.model in self.registry.names
        label_model = error.model if known and error.model else "unknown"
        versions = self.registry.versions(label_model) if known else []
        label_version = error.version if error.version in versions else ""
        self._count(label_model, label_version or "", outcome, origin.timestamp_ms)
        return records

    def undeliverable(
        self, origin: Origin, record: Record, code: str, message: str, replacing: bool = False
    ) -> list[Record]:
        """What replaces ``record``, which the producer or the broker refused for itself
        (``code``: `codec.RECORD_TOO_LARGE` or `codec.DELIVERY_FAILED`).

        A DLQ record too large for its topic is sent again without the original's bytes.
        Any other record ends its request: its DLQ record with ``code`` and, where the request
        can be answered, an error response (where the refused answer would have gone, when it
        was only too large). A ``replacing`` record (itself such a replacement) that is not a
        DLQ record is given up: the request's DLQ record says what became of it.
        """
        s = self.settings
        if replacing and record.topic != s.dlq_topic:
            log.error("answer to %s refused again (%s); its DLQ record stands", record.topic, code)
            return []
        if record.topic == s.dlq_topic:
            if code == codec.RECORD_TOO_LARGE and codec.decode_dlq(record.value).original_b64:
                return [Record(record.topic, record.key, codec.shrink_dlq(record.value),
                               record.headers)]  # fmt: skip
            log.error("cannot dead-letter %s:%s:%s (%s: %s)",
                      origin.topic, origin.partition, origin.offset, code, message)  # fmt: skip
            return []
        request_id = record.key.decode(errors="replace") if record.key else None
        reply_to = None
        if record.topic == s.results_topic:  # split: the infer stage's result for respond
            stage = "infer"
            with contextlib.suppress(RequestError):
                reply_to = codec.decode_result(record.value).reply_to
        elif record.topic.startswith(s.infer_topic("")):
            stage = "gateway"
        else:  # an answer: refused by the topic it was for
            stage = "respond" if origin.topic == s.results_topic else "infer"
            reply_to = record.topic
        if code != codec.RECORD_TOO_LARGE or reply_to == s.responses_topic:
            reply_to = None  # its topic refuses records: answer on the default topic
        what = f"a {len(record.value)}-byte record for topic {record.topic} was refused"
        error = RequestError(code, f"{what}: {message}", request_id, reply_to=reply_to)
        return self.reject_records(origin, error, stage)

    def _count(self, model: str, version: str, outcome: str, produced_ms: float) -> None:
        self._count_many(model, version, outcome, [produced_ms])

    def _count_many(
        self, model: str, version: str, outcome: str, produced_ms: Sequence[float]
    ) -> None:
        """Count requests that ended with ``outcome`` and observe their latencies at once."""
        key = (model, version, outcome)
        children = self._children.get(key)
        if children is None:  # labels() costs a lookup under a lock: once per label set
            children = self._children[key] = (
                self.metrics.requests.labels(model, version, outcome),
                self.metrics.request_latency.labels(model, version, "respond"),
            )
        children[0].inc(len(produced_ms))
        latencies_s = (now_ms() - np.asarray(produced_ms, dtype=np.float64)) / 1000.0
        children[1].observe_many(np.maximum(latencies_s, 0.0))

    # -- async publishing (faust agents) ----------------------------------------------------

    async def gateway(self, origin: Origin) -> Job | None:
        """Admit a record, or dead-letter it (and answer where possible); None if rejected."""
        admitted = self.admit_or_reject(origin)
        if isinstance(admitted, Job):
            return admitted
        await self.publish([admitted])
        return None

    async def forward(self, job: Job) -> None:
        await self.publish([self.forward_record(job)])

    async def respond(self, outcomes: Sequence[Outcome], stage: str = "infer") -> None:
        await self.publish(self.response_records(outcomes, stage))

    async def publish_results(self, outcomes: Sequence[Outcome]) -> None:
        await self.publish(self.result_records(outcomes))

    async def respond_record(self, origin: Origin) -> None:
        await self.publish([self.respond_result_records(origin)])

    async def reject(self, origin: Origin, error: RequestError, stage: str) -> None:
        await self.publish([(origin, self.reject_records(origin, error, stage))])

    async def publish(self, publications: Sequence[Publication]) -> None:
        """Send every record through the sink; ack each source once its records are in."""
        for origin, records in publications:
            deliveries = await self._send(origin, records)
            task = asyncio.ensure_future(self._await_then_ack(deliveries, origin))
            self._acks.add(task)
            task.add_done_callback(self._acks.discard)

    async def _send(
        self, origin: Origin, records: list[Record], replacing: bool = False
    ) -> list[tuple[Record, bool, Awaitable[Any]]]:
        """Hand ``records`` to the sink; one it refuses for itself is replaced at once
        (``replacing`` marks such replacements)."""
        assert self.sink is not None, "async publishing needs a sink"
        deliveries: list[tuple[Record, bool, Awaitable[Any]]] = []
        for r in records:
            try:
                delivery = await self.sink(r.topic, r.key, r.value, r.headers)
                deliveries.append((r, replacing, delivery))
            except Exception as exc:
                code = record_error(exc)
                if code is None:
                    raise
                deliveries += await self._send(
                    origin, self.undeliverable(origin, r, code, str(exc), replacing), True
                )
        return deliveries

    async def _await_then_ack(
        self, deliveries: list[tuple[Record, bool, Awaitable[Any]]], origin: Origin
    ) -> None:
        try:
            while deliveries:
                record, replacing, delivery = deliveries.pop(0)
                try:
                    await delivery
                except Exception as exc:
                    code = record_error(exc)
                    if code is None:
                        raise
                    # Refused by the broker for itself: replaced, and the replacements awaited.
                    deliveries += await self._send(
                        origin, self.undeliverable(origin, record, code, str(exc), replacing), True
                    )
        except Exception:  # noqa: BLE001 - not acked: the record is consumed again
            log.exception(
                "publish failed for %s:%s:%s; left unacked for redelivery",
                origin.topic,
                origin.partition,
                origin.offset,
            )
            return
        if origin.ack is not None:
            result = origin.ack()
            if inspect.isawaitable(result):
                await result

    async def drain(self) -> None:
        """Wait until every pending publish has been delivered and acked."""
        while self._acks:
            await asyncio.gather(*list(self._acks), return_exceptions=True)


def is_transient(exc: BaseException) -> bool:
    """Errors worth retrying: the device ran out of memory (others are the request's fault)."""
    if isinstance(exc, MemoryError):
        return True
    oom = getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return True
    return "out of memory" in str(exc).lower()


def _groups(outcomes: Sequence[Outcome]) -> list[list[Outcome]]:
    """Runs of outcomes that are all errors, or all rows of one batch's outputs."""
    groups: list[list[Outcome]] = []
    for o in outcomes:
        if groups:
            last = groups[-1][0]
            same = (
                (o.error is not None and last.error is not None)
                if o.error is not None or last.error is not None
                else o.batch_outputs is last.batch_outputs and o.batch_outputs is not None
            )
            if same:
                groups[-1].append(o)
                continue
        groups.append([o])
    return groups


def _rows(group: list[Outcome]) -> list[np.ndarray]:
    """The group's rows of every output, stacked: one array per output."""
    first = group[0]
    if first.batch_outputs is not None:
        rows = [o.row for o in group]
        if rows == list(range(first.batch_size)):
            return first.batch_outputs
        return [out[rows] for out in first.batch_outputs]
    assert first.outputs is not None
    return [np.stack([o.outputs[k] for o in group]) for k in range(len(first.outputs))]  # type: ignore[index]


def _top_k(
    labels: Sequence[str], outputs: list[np.ndarray], ks: list[int]
) -> list[tuple[list[str], list[float]]] | None:
    """Softmax top-k labels and scores per row, for classifiers (models with labels)."""
    if not labels or not outputs:
        return None
    logits = outputs[0].reshape(len(ks), -1).astype(np.float64)
    if logits.shape[1] != len(labels):
        return None
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    order = np.argsort(-probs, axis=1, kind="stable")
    scores = np.take_along_axis(probs, order, axis=1).astype(np.float32).tolist()
    order_list = order.tolist()
    out = []
    for i, k in enumerate(ks):
        k = min(k, len(labels))
        out.append(([labels[j] for j in order_list[i][:k]], scores[i][:k]))
    return out


def postprocess(
    labels: Sequence[str], outputs: list[np.ndarray], top_k: int | None
) -> list[Tensor]:
    """Classifier models (with labels) add top-k ``labels`` and softmax ``scores``."""
    top = _top_k(labels, [o[None] for o in outputs], [top_k or 1])
    if top is None:
        return []
    names, scores = top[0]
    k = len(names)
    return [
        Tensor(name="labels", datatype="BYTES", shape=[k], data=names),
        Tensor(name="scores", datatype="FP32", shape=[k], data=scores),
    ]


def _deadline_ms(request: codec.Request, produced_ms: float, default_ttl_ms: int) -> float | None:
    if request.deadline_ms is not None:
        return float(request.deadline_ms)
    ttl = request.ttl_ms or default_ttl_ms
    return produced_ms + ttl if ttl else None
