"""The pipeline's three stages as library calls: gateway, infer, respond.

Agents (``agents/``) feed records in and provide a `Sink` to publish to; everything here is
testable without Kafka. Errors never escape as exceptions: a request that cannot be served
ends as a DLQ record with a reason and, where the requester can be answered, an ``error`` or
``expired`` response.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pipeline import codec
from pipeline.codec import RequestError, Response, Tensor
from pipeline.config import Settings
from pipeline.metrics import Metrics
from pipeline.models import LoadedModel, ModelLoadError, ModelRegistry

log = logging.getLogger(__name__)

Headers = list[tuple[str, bytes]]
ORIGIN_HEADER = "sluice-origin"


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


@dataclass(slots=True)
class Outcome:
    """What became of one job in a batch: outputs (one row per model output) or an error."""

    job: Job
    outputs: list[np.ndarray] | None = None
    error: RequestError | None = None
    inference_ms: float = 0.0
    batch_size: int = 0


def now_ms() -> float:
    return time.time() * 1000.0


class Pipeline:
    """Gateway, infer and respond logic shared by the split, fused and naive workers."""

    def __init__(
        self, settings: Settings, registry: ModelRegistry, sink: Sink, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        self._acks: set[asyncio.Task[None]] = set()

    # -- gateway --------------------------------------------------------------------------

    def admit(self, origin: Origin) -> Job:
        """Decode, validate, resolve the model and check the deadline; raise `RequestError`."""
        request = codec.decode_request(origin.value, self.settings.max_payload_bytes)
        context = {
            "request_id": request.id,
            "model": request.model,
            "version": request.version,
            "reply_to": request.reply_to,
        }
        try:
            model = self.registry.resolve(request.model, request.version)
        except RequestError as exc:
            raise RequestError(exc.code, exc.message, **context) from None
        except ModelLoadError as exc:
            self.metrics.model_load_failures.labels(request.model).inc()
            raise RequestError(codec.MODEL_ERROR, str(exc), **context) from None
        context["version"] = model.version
        try:
            arrays = model.inputs_from_request(
                request.inputs, self.settings.max_elements_per_tensor
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

    async def gateway(self, origin: Origin) -> Job | None:
        """Admit a record, or dead-letter it (and answer where possible); None if rejected."""
        try:
            return self.admit(origin)
        except RequestError as exc:
            await self.reject(origin, exc, "gateway")
        except Exception as exc:  # noqa: BLE001 - a record must never stop the worker
            log.exception(
                "unexpected error admitting %s:%s:%s", origin.topic, origin.partition, origin.offset
            )
            await self.reject(
                origin, RequestError(codec.MALFORMED, f"{type(exc).__name__}: {exc}"), "gateway"
            )
        return None

    async def forward(self, job: Job) -> None:
        """Split mode: publish an admitted request to its model's infer topic."""
        o = job.origin
        headers = [*o.headers, (ORIGIN_HEADER, f"{o.topic}:{o.partition}:{o.offset}".encode())]
        key = (job.request.key or job.request.id).encode()
        assert o.value is not None
        delivery = await self.sink(self.settings.infer_topic(job.model.name), key, o.value, headers)
        self.metrics.inflight.dec()
        self._ack_after([delivery], o)

    # -- infer ----------------------------------------------------------------------------

    def infer(self, jobs: Sequence[Job]) -> list[Outcome]:
        """Run a batch of jobs for one model; expired jobs are answered without computing.

        A batch that raises is bisected, so a poison request fails alone.
        """
        outcomes: list[Outcome] = []
        live: list[Job] = []
        t = now_ms()
        for job in jobs:
            job.started_ms = t
            if job.deadline_ms is not None and t >= job.deadline_ms:
                outcomes.append(
                    Outcome(
                        job,
                        error=RequestError(
                            codec.EXPIRED,
                            "deadline passed while queued for a batch",
                            job.request.id,
                            job.model.name,
                            job.model.version,
                            job.request.reply_to,
                        ),
                    )
                )
            else:
                live.append(job)
        if live:
            outcomes.extend(self._run_bisect(live))
        return outcomes

    def _run_bisect(self, jobs: list[Job]) -> list[Outcome]:
        model = jobs[0].model
        t0 = time.perf_counter()
        try:
            stacked = [np.stack([j.arrays[i] for j in jobs]) for i in range(len(jobs[0].arrays))]
            outputs = model.run(stacked)
        except Exception as exc:  # noqa: BLE001 - any model failure is the request's error
            if len(jobs) > 1:
                mid = len(jobs) // 2
                return self._run_bisect(jobs[:mid]) + self._run_bisect(jobs[mid:])
            job = jobs[0]
            return [
                Outcome(
                    job,
                    error=RequestError(
                        codec.MODEL_ERROR,
                        f"{type(exc).__name__}: {exc}",
                        job.request.id,
                        model.name,
                        model.version,
                        job.request.reply_to,
                    ),
                )
            ]
        elapsed_s = time.perf_counter() - t0
        self.metrics.batch_size.labels(model.name).observe(len(jobs))
        self.metrics.inference.labels(model.name).observe(elapsed_s)
        return [
            Outcome(
                job, [o[i] for o in outputs], inference_ms=elapsed_s * 1000, batch_size=len(jobs)
            )
            for i, job in enumerate(jobs)
        ]

    # -- respond --------------------------------------------------------------------------

    async def respond(self, outcomes: Sequence[Outcome], stage: str = "infer") -> None:
        """Fused mode: publish each outcome's response (errors also to the DLQ)."""
        for outcome in outcomes:
            job = outcome.job
            self.metrics.inflight.dec()
            if outcome.error is not None:
                await self.reject(job.origin, outcome.error, stage)
                continue
            assert outcome.outputs is not None
            await self._publish_response(self._result(outcome), outcome.outputs, job.origin)

    async def publish_results(self, outcomes: Sequence[Outcome]) -> None:
        """Split mode, infer stage: publish raw outputs to the results topic."""
        for outcome in outcomes:
            job = outcome.job
            self.metrics.inflight.dec()
            if outcome.error is not None:
                await self.reject(job.origin, outcome.error, "infer")
                continue
            assert outcome.outputs is not None
            result = self._result(outcome)
            result.outputs = [
                codec.array_to_tensor(spec.name, out)
                for spec, out in zip(job.model.config.outputs, outcome.outputs, strict=False)
            ]
            o = job.origin
            headers = [
                *o.correlation_headers(),
                (ORIGIN_HEADER, f"{o.topic}:{o.partition}:{o.offset}".encode()),
            ]
            delivery = await self.sink(
                self.settings.results_topic, job.request.id.encode(), codec.encode(result), headers
            )
            self._ack_after([delivery], o)

    async def respond_record(self, origin: Origin) -> None:
        """Split mode, respond stage: postprocess a results-topic record and publish it."""
        try:
            result = codec.decode_result(origin.value or b"")
            arrays = [codec.tensor_to_array(t, 1 << 62) for t in result.outputs]
        except (RequestError, ValueError) as exc:
            error = (
                exc if isinstance(exc, RequestError) else RequestError(codec.MALFORMED, str(exc))
            )
            await self.reject(origin, error, "respond")
            return
        try:
            await self._publish_response(result, arrays, origin)
        except RequestError as exc:
            # e.g. a version this process does not know (the infer stage served it).
            await self.reject(origin, RequestError(
                exc.code, exc.message, result.id, result.model, result.model_version,
                result.reply_to), "respond")  # fmt: skip

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
            produced_ms=job.origin.timestamp_ms,
            received_ms=job.received_ms,
            started_ms=job.started_ms,
            inference_ms=outcome.inference_ms,
            batch_size=outcome.batch_size,
        )

    async def _publish_response(
        self, result: codec.ResultRecord, outputs: list[np.ndarray], origin: Origin
    ) -> None:
        config = self.registry.config(result.model, result.model_version)
        tensors = [
            codec.array_to_tensor(spec.name, out)
            for spec, out in zip(config.outputs, outputs, strict=False)
        ]
        tensors += postprocess(config.labels, outputs, result.top_k)
        response = Response(
            id=result.id,
            status="ok",
            model=result.model,
            model_version=result.model_version,
            outputs=tensors,
            timings=codec.Timings(
                queue_ms=round(result.started_ms - result.received_ms, 3),
                inference_ms=round(result.inference_ms, 3),
                total_ms=round(now_ms() - result.produced_ms, 3),
                batch_size=result.batch_size,
            ),
        )
        topic = result.reply_to or self.settings.responses_topic
        delivery = await self.sink(
            topic, result.id.encode(), codec.encode(response), origin.correlation_headers()
        )
        self._count(result.model, result.model_version, "ok", result.produced_ms)
        self._ack_after([delivery], origin)

    # -- errors ---------------------------------------------------------------------------

    async def reject(self, origin: Origin, error: RequestError, stage: str) -> None:
        """Dead-letter a record and answer its requester when it can be identified."""
        deliveries = [
            await self.sink(
                self.settings.dlq_topic,
                error.request_id.encode() if error.request_id else None,
                codec.dlq_record(
                    origin.value, origin.topic, origin.partition, origin.offset, stage, error
                ),
                origin.correlation_headers(),
            )
        ]
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
            deliveries.append(
                await self.sink(
                    error.reply_to or self.settings.responses_topic,
                    error.request_id.encode(),
                    codec.encode(response),
                    origin.correlation_headers(),
                )
            )
        outcome = "expired" if error.code == codec.EXPIRED else "error"
        # Label values must stay bounded: only models and versions that exist on disk.
        known = error.model is not None and error.model in self.registry.names
        label_model = error.model if known and error.model else "unknown"
        versions = self.registry.versions(label_model) if known else []
        label_version = error.version if error.version in versions else ""
        self._count(label_model, label_version, outcome, origin.timestamp_ms)
        self._ack_after(deliveries, origin)

    def _count(self, model: str, version: str, outcome: str, produced_ms: float) -> None:
        self.metrics.requests.labels(model, version, outcome).inc()
        latency_s = max(0.0, (now_ms() - produced_ms) / 1000.0)
        self.metrics.request_latency.labels(model, version, "respond").observe(latency_s)

    # -- acking ---------------------------------------------------------------------------

    def _ack_after(self, deliveries: list[Awaitable[Any]], origin: Origin) -> None:
        """Ack the source record once every record published for it is on the broker."""
        task = asyncio.ensure_future(self._await_then_ack(deliveries, origin))
        self._acks.add(task)
        task.add_done_callback(self._acks.discard)

    async def _await_then_ack(self, deliveries: list[Awaitable[Any]], origin: Origin) -> None:
        try:
            for d in deliveries:
                await d
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


def postprocess(
    labels: Sequence[str], outputs: list[np.ndarray], top_k: int | None
) -> list[Tensor]:
    """Classifier models (with labels) add top-k ``labels`` and softmax ``scores``."""
    if not labels or not outputs:
        return []
    logits = outputs[0].astype(np.float64).reshape(-1)
    if logits.size != len(labels):
        return []
    k = min(top_k or 1, len(labels))
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    top = np.argsort(-probs, kind="stable")[:k]
    return [
        Tensor(name="labels", datatype="BYTES", shape=[k], data=[labels[i] for i in top]),
        Tensor(
            name="scores",
            datatype="FP32",
            shape=[k],
            data=[float(np.float32(probs[i])) for i in top],
        ),
    ]


def _deadline_ms(request: codec.Request, produced_ms: float, default_ttl_ms: int) -> float | None:
    if request.deadline_ms is not None:
        return float(request.deadline_ms)
    ttl = request.ttl_ms or default_ttl_ms
    return produced_ms + ttl if ttl else None
