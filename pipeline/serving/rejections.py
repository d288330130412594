"""Rejections: the DLQ record (and, where the requester can be identified, the error
answer) for a request that cannot be served, or whose records Kafka refused; and the
request counters every outcome passes through."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import Settings
from pipeline.models import ModelRegistry
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.protocol.codec import RequestError, Response
from pipeline.serving.records import Origin, Record, Sink, now_ms

if TYPE_CHECKING:
    from pipeline.experiments.live import LiveExperiments
    from pipeline.features.store import FeatureStore
    from pipeline.serving.result_cache import ResultCache

log = logging.getLogger(__name__)


class Rejections:
    """The shared state of the serving layer, and its rejections."""

    settings: Settings
    registry: ModelRegistry
    metrics: Metrics
    sink: Sink | None
    features: FeatureStore | None
    results: ResultCache | None
    _acks: set[asyncio.Task[None]]
    _children: dict[tuple[str, str, str, str], tuple[Any, Any]]
    _batch_children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]]
    experiments: LiveExperiments | None

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
                variant=error.variant,
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
        self._counted(label_model, label_version or "", outcome, [origin.timestamp_ms],
                      error.variant)  # fmt: skip
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

    def _counted(
        self,
        model: str,
        version: str,
        outcome: str,
        produced_ms: Sequence[float],
        variant: str | None,
    ) -> None:
        """Count requests, and tell the experiment's rollback guard how its variant's ended."""
        latencies_s = self._count_many(model, version, outcome, produced_ms, variant or "")
        if variant is not None and self.experiments is not None:
            for latency_s in latencies_s.tolist():
                self.experiments.record(model, variant, latency_s, outcome == "ok")

    def _count_many(
        self,
        model: str,
        version: str,
        outcome: str,
        produced_ms: Sequence[float],
        variant: str = "",
    ) -> np.ndarray:
        """Count requests that ended with ``outcome`` and observe their latencies at once;
        returns the latencies (seconds)."""
        key = (model, version, outcome, variant)
        children = self._children.get(key)
        if children is None:  # labels() costs a lookup under a lock: once per label set
            children = self._children[key] = (
                self.metrics.requests.labels(model, version, outcome, variant),
                self.metrics.request_latency.labels(model, version, "respond", variant),
            )
        children[0].inc(len(produced_ms))
        latencies_s = np.maximum(
            (now_ms() - np.asarray(produced_ms, dtype=np.float64)) / 1000.0, 0.0
        )
        children[1].observe_many(latencies_s)
        return latencies_s
