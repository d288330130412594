"""Admission: decode and validate a record, resolve its model, enrich it with features,
check its deadline, or turn it into a rejection."""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from pipeline.models import LoadedModel, ModelLoadError
from pipeline.protocol import codec
from pipeline.protocol.codec import RequestError
from pipeline.serving.execution import Execution
from pipeline.serving.records import (
    ORIGIN_HEADER,
    ROLE_HEADER,
    SESSION_HEADER,
    VARIANT_HEADER,
    VERSION_HEADER,
    Deferred,
    Job,
    Origin,
    Publication,
    Record,
    now_ms,
)

if TYPE_CHECKING:
    from pipeline.experiments.config import Shadow

log = logging.getLogger(__name__)


class Admission(Execution):
    """Records into admitted requests (`Job`) or rejections."""

    # -- gateway --------------------------------------------------------------------------

    def admit(self, origin: Origin, received_ms: float | None = None) -> Job:
        """Decode, validate, resolve the model and check the deadline; raise `RequestError`.
        (Not counted in flight: `admit_or_reject` and `admit_many` count what they admit.)"""
        request, model, context = self._resolve(origin)
        if self.features is not None:
            entry = self._feature_entry(origin, request, model)
            request = self._enriched(self.features.enrich_many([entry])[0], context)
        received = now_ms() if received_ms is None else received_ms
        return self._job(origin, request, model, context, received)

    def _counted_in_flight(self, admitted: list[Job | Publication]) -> list[Job | Publication]:
        """Count the admitted jobs (and their shadows' copies) in flight, once per batch."""
        n = 0
        for a in admitted:
            if type(a) is Job:
                n += 1 if a.mirror is None else 2
        if n:
            self.metrics.inflight.inc(n)
        return admitted

    @functools.cached_property
    def _infer_prefix(self) -> str:
        return self.settings.infer_topic("")

    def _tick(self) -> None:
        if self.experiments is not None:
            self.experiments.tick()  # at most once per experiment_reload_s

    def _resolve(self, origin: Origin) -> tuple[codec.Request, LoadedModel, dict[str, Any]]:
        """Decode and validate the request and resolve its model (`RequestError` if not)."""
        fmt = codec.content_type(origin.headers) if origin.headers else codec.JSON
        request = codec.decode_request(origin.value, self.settings.max_payload_bytes, fmt)
        context: dict[str, Any] = {
            "request_id": request.id,
            "model": request.model,
            "version": request.version,
            "reply_to": request.reply_to,
            "variant": None,
        }
        if request.reply_to is not None and not self.settings.reply_to_allowed(request.reply_to):
            # A message never chooses where the worker writes: answered on the default topic.
            context["reply_to"] = None
            raise RequestError(
                codec.FORBIDDEN_REPLY_TO,
                f"reply_to {request.reply_to!r} is not an allowed reply topic (the responses "
                f"topic or SLUICE_REPLY_TO_TOPICS: {','.join(self.settings.reply_to_patterns)})",
                **_fields(context),
            )
        if origin.headers or origin.key_bytes > self.settings.max_key_bytes:
            self._check_envelope(origin, context)
        if self.experiments is None and not origin.topic.startswith(self._infer_prefix):
            version = request.version  # what `_route` gives such a record, in one test
        else:
            version = self._route(origin, request, context)
        try:
            model = self.registry.resolve(request.model, version)
        except RequestError as exc:
            raise RequestError(exc.code, exc.message, **_fields(context)) from None
        except ModelLoadError as exc:
            self.metrics.model_load_failures.labels(request.model).inc()
            raise RequestError(codec.MODEL_ERROR, str(exc), **_fields(context)) from None
        context["version"] = model.version
        return request, model, context

    def _route(self, origin: Origin, request: codec.Request, context: dict[str, Any]) -> str | None:
        """The version to serve: the request's own, else its experiment variant's (sticky by
        key), else the newest. In split mode the gateway's choice travels in the infer
        record's headers (written by the pipeline, never by a client: infer topics are its
        own)."""
        if origin.topic.startswith(self._infer_prefix):
            pinned = origin.header(VERSION_HEADER)
            if pinned is not None:
                variant, role = origin.header(VARIANT_HEADER), origin.header(ROLE_HEADER)
                if variant is not None and self.experiments is not None:
                    name = self.experiments.known(request.model, variant.decode(errors="replace"))
                    context["variant"] = name
                    if name is not None and role in (b"primary", b"shadow"):
                        context["role"] = role.decode()
                return pinned.decode(errors="replace")
            return request.version
        if request.version is not None or self.experiments is None:
            return request.version
        route = self.experiments.route(request.model, request.key, request.id)
        if route is None:
            return None
        context["variant"] = route.variant
        if route.shadow is not None:
            context["shadow"] = route.shadow
        return route.version

    def _check_envelope(self, origin: Origin, context: dict[str, Any]) -> None:
        """The record's key and headers within their limits (`RequestError` if not)."""
        s = self.settings
        if origin.key_bytes > s.max_key_bytes:
            raise RequestError(
                codec.KEY_TOO_LARGE,
                f"record key of {origin.key_bytes} bytes > {s.max_key_bytes} (max_key_bytes)",
                **_fields(context),
            )
        count = len(origin.headers)
        size = sum(len(k) + len(v or b"") for k, v in origin.headers) if count else 0
        if count > s.max_headers or size > s.max_header_bytes:
            raise RequestError(
                codec.TOO_MANY_HEADERS,
                f"{count} headers of {size} bytes (at most {s.max_headers} headers "
                f"of {s.max_header_bytes} bytes: max_headers, max_header_bytes)",
                **_fields(context),
            )

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
            raise RequestError(result.code, result.message, **_fields(context)) from None
        return result

    def _job(
        self,
        origin: Origin,
        request: codec.Request,
        model: LoadedModel,
        context: dict[str, Any],
        received_ms: float,
    ) -> Job:
        try:
            arrays = model.inputs.from_request(
                request.inputs, self.settings.max_elements_per_tensor, flat=True
            )
        except RequestError as exc:
            raise RequestError(exc.code, exc.message, **_fields(context)) from None
        deadline = _deadline_ms(request, origin.timestamp_ms, self.settings.default_ttl_ms)
        job = Job(request, model, arrays, deadline, origin, received_ms,
                  variant=context["variant"], role=context.get("role"))  # fmt: skip
        if deadline is not None and job.received_ms >= deadline:
            raise RequestError(
                codec.EXPIRED, "deadline passed before the request was admitted", **_fields(context)
            )
        shadow = context.get("shadow")
        if shadow is not None:
            job.mirror = self._mirror(job, shadow)
        return job

    def _mirror(self, job: Job, shadow: Shadow) -> Job | None:
        """The shadow's copy of a mirrored request (None if the shadow cannot take it: the
        primary is served all the same)."""
        request = job.request
        try:
            model = self.registry.resolve(request.model, shadow.version)
            arrays = model.inputs.from_request(
                request.inputs, self.settings.max_elements_per_tensor, flat=True
            )
        except Exception as exc:  # noqa: BLE001 - the shadow's trouble, never the request's
            log.warning("shadow %s of %s skips %s: %s", shadow.name, request.model, request.id, exc)
            return None
        job.role = "primary"
        # The record is acked (faust) once the primary's answer is delivered, never by the
        # shadow's: a shadow record is best-effort.
        origin = msgspec.structs.replace(job.origin, ack=None)
        return Job(request, model, arrays, job.deadline_ms, origin, job.received_ms,
                   variant=shadow.name, role="shadow")  # fmt: skip

    def admit_or_reject(self, origin: Origin) -> Job | Publication:
        """A `Job`, or the DLQ record (and answer) for a record that cannot be served."""
        self._tick()
        return self._counted_in_flight([self._admit_or_reject(origin, now_ms())])[0]

    def _admit_or_reject(self, origin: Origin, received_ms: float) -> Job | Publication:
        try:
            job = self.admit(origin, received_ms)
            if self.results is not None:
                return self.cached_response(job) or job
            return job
        except Exception as exc:  # noqa: BLE001 - a record must never stop the worker
            return self._rejected(origin, exc)

    def admit_many(self, origins: Sequence[Origin]) -> list[Job | Publication]:
        """`admit_or_reject` for a consumed batch, in order. The batch's feature-store misses
        share one source round trip, so a batch waits for the cold source once, not once
        per miss. (The batch engine does not wait at all: `admit_cached`.)"""
        self._tick()
        received = now_ms()  # one time for the batch: it was consumed at once
        if self.features is None or len(origins) < 2:
            return self._counted_in_flight([self._admit_or_reject(o, received) for o in origins])
        admitted, deferred = self._admit_cached(origins, received)
        if deferred is not None:
            admitted.update(self._admit_fetched(deferred, self.fetch_features(deferred)))
        return self._counted_in_flight([admitted[i] for i in sorted(admitted)])

    def admit_cached(
        self, origins: Sequence[Origin]
    ) -> tuple[list[Job | Publication], Deferred | None]:
        """`admit_many` without waiting for the feature source: the requests whose features
        only the source has come back in a `Deferred`, to admit with `admit_fetched` once
        `fetch_features` (on another thread, say) has them."""
        self._tick()
        received = now_ms()
        if self.features is None:
            admitted_now = [self._admit_or_reject(o, received) for o in origins]
            return self._counted_in_flight(admitted_now), None
        admitted, deferred = self._admit_cached(origins, received)
        return self._counted_in_flight([admitted[i] for i in sorted(admitted)]), deferred

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
        return self._counted_in_flight([admitted[i] for i in sorted(admitted)])

    def _admit_cached(
        self, origins: Sequence[Origin], received_ms: float
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
                out[i] = self._admitted(origins[i], result, model, context, received_ms)
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
            out[i] = self._admitted(deferred.origins[i], result, model, context, now_ms())
        return out

    def _admitted(
        self,
        origin: Origin,
        result: codec.Request | Exception,
        model: LoadedModel,
        context: dict[str, Any],
        received_ms: float,
    ) -> Job | Publication:
        """A job for an enriched request (or its answer from the result cache), or the
        records that reject it."""
        try:
            if isinstance(result, Exception) and not isinstance(result, RequestError):
                raise result
            job = self._job(origin, self._enriched(result, context), model, context, received_ms)
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
        """Split mode: the admitted request, unchanged, on its model's infer topic (with its
        experiment variant's version and role in headers, when it has one)."""
        o = job.origin
        assert o.value is not None
        self.metrics.inflight.dec()
        # The pipeline's own headers are the gateway's to write, never the client's.
        headers = [h for h in o.headers if h[0] not in _INTERNAL_HEADERS]
        headers.append((ORIGIN_HEADER, f"{o.topic}:{o.partition}:{o.offset}".encode()))
        if job.variant is not None:
            headers += [(VERSION_HEADER, job.model.version.encode()),
                        (VARIANT_HEADER, job.variant.encode())]  # fmt: skip
            if job.role is not None:
                headers.append((ROLE_HEADER, job.role.encode()))
        key = (job.request.key or job.request.id).encode()
        return o, [Record(self.settings.infer_topic(job.model.name), key, o.value, headers)]


def _deadline_ms(request: codec.Request, produced_ms: float, default_ttl_ms: int) -> float | None:
    if request.deadline_ms is not None:
        return float(request.deadline_ms)
    ttl = request.ttl_ms or default_ttl_ms
    return produced_ms + ttl if ttl else None


_INTERNAL_HEADERS = frozenset({ORIGIN_HEADER, VERSION_HEADER, VARIANT_HEADER, ROLE_HEADER})

# What a request's admission context tells its `RequestError` (the rest is routing).
_ERROR_FIELDS = ("request_id", "model", "version", "reply_to", "variant")


def _fields(context: Mapping[str, Any]) -> dict[str, Any]:
    return {k: context[k] for k in _ERROR_FIELDS if k in context}
