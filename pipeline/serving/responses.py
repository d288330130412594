"""Responses: outputs postprocessed (top-k labels and scores) into answers, the split
mode's result records, and the result cache's answers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np

from pipeline.protocol import codec
from pipeline.protocol.codec import RequestError, Response, Tensor
from pipeline.serving.records import (
    ORIGIN_HEADER,
    Job,
    Origin,
    Outcome,
    Publication,
    Record,
    now_ms,
)
from pipeline.serving.rejections import Rejections

log = logging.getLogger(__name__)


class Responses(Rejections):
    """Outputs into answers (and the result cache's answers)."""

    # -- respond --------------------------------------------------------------------------

    def response_records(self, outcomes: Sequence[Outcome], stage: str) -> list[Publication]:
        """Fused mode: each outcome's response (errors: DLQ record and error response); a
        mirrored request's outputs, the primary's and the shadow's, to the shadow topic."""
        publications: list[Publication] = []
        if any(o.job.role is not None for o in outcomes):
            publications += [self._shadow_record(o) for o in outcomes if o.job.role is not None]
            outcomes = [o for o in outcomes if o.job.role != "shadow"]
        for group in _groups(outcomes):
            if group[0].error is not None:
                for o in group:
                    self.metrics.inflight.dec()
                    assert o.error is not None
                    o.error.variant = o.job.variant
                    publications.append(
                        (o.job.origin, self.reject_records(o.job.origin, o.error, stage))
                    )
                continue
            self.metrics.inflight.dec(len(group))
            model = group[0].job.model
            metas = _results(group)
            outputs = _rows(group)
            values = self._responses(model.name, model.version, outputs, metas)
            if self.results is not None:
                for i, o in enumerate(group):
                    self._fill_result(o.job, [out[i] for out in outputs])
            topic = self.settings.responses_topic
            for o, meta, value in zip(group, metas, values, strict=True):
                origin = o.job.origin
                record = Record(meta.reply_to or topic, meta.id.encode(), value,
                                origin.correlation_headers())  # fmt: skip
                publications.append((origin, [record]))
        return publications

    def result_records(self, outcomes: Sequence[Outcome]) -> list[Publication]:
        """Split mode, infer stage: raw outputs for the results topic (a shadow's failure
        straight to the shadow topic: it answers nobody)."""
        publications: list[Publication] = []
        for o in outcomes:
            job, origin = o.job, o.job.origin
            if o.error is not None and job.role == "shadow":
                publications.append(self._shadow_record(o))
                continue
            self.metrics.inflight.dec()
            if o.error is not None:
                o.error.variant = job.variant
                publications.append((origin, self.reject_records(origin, o.error, "infer")))
                continue
            rows = o.outputs
            assert rows is not None
            [result] = _results([o])
            if self.results is not None:
                self._fill_result(job, rows)
            result.outputs = [
                codec.array_to_tensor(spec.name, out)
                for spec, out in zip(job.model.config.outputs, rows, strict=False)
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
        """Split mode, respond stage: postprocess one results-topic record into a response
        (a mirrored request's sides to the shadow topic)."""
        if self.experiments is not None:
            self.experiments.tick()
        try:
            result = codec.decode_result(origin.value or b"")
            arrays = [_result_array(t) for t in result.outputs]
        except (RequestError, ValueError) as exc:
            error = (
                exc if isinstance(exc, RequestError) else RequestError(codec.MALFORMED, str(exc))
            )
            return origin, self.reject_records(origin, error, "respond")
        if result.variant is not None:  # a label value only if the config names it
            live = self.experiments
            known = live.known(result.model, result.variant) if live is not None else None
            result.variant = known
            result.role = result.role if known is not None else None
        if result.role == "shadow":
            return origin, [self._respond_shadow(origin, result)]
        shadow = [self._respond_shadow(origin, result)] if result.role == "primary" else []
        try:
            [value] = self._responses(result.model, result.model_version, arrays, [result])
        except RequestError as exc:
            # e.g. a version this process does not know (the infer stage served it).
            error = RequestError(
                exc.code, exc.message, result.id, result.model, result.model_version,
                result.reply_to, variant=result.variant,
            )  # fmt: skip
            return origin, self.reject_records(origin, error, "respond")
        topic = result.reply_to or self.settings.responses_topic
        answer = Record(topic, result.id.encode(), value, origin.correlation_headers())
        return origin, [answer, *shadow]

    def _respond_shadow(self, origin: Origin, result: codec.ResultRecord) -> Record:
        """Split mode, respond stage: a mirrored request's side for the shadow topic."""
        record = codec.ShadowRecord(
            id=result.id, model=result.model, model_version=result.model_version,
            variant=result.variant or "", role=result.role or "", status="ok",
            outputs=result.outputs, total_ms=round(now_ms() - result.produced_ms, 3),
        )  # fmt: skip
        return Record(self.settings.shadow_topic, result.id.encode(), codec.encode(record), [])

    def _shadow_record(self, outcome: Outcome) -> Publication:
        """A mirrored request's side (``outcome.job.role``) for the shadow topic. A shadow's
        outcome ends here: its count in flight too."""
        job = outcome.job
        if job.role == "shadow":
            self.metrics.inflight.dec()
        rows = outcome.outputs
        outputs = None
        if rows is not None:
            outputs = [
                codec.array_to_tensor(spec.name, out)
                for spec, out in zip(job.model.config.outputs, rows, strict=False)
            ]
        error = outcome.error
        record = codec.ShadowRecord(
            id=job.request.id, model=job.model.name, model_version=job.model.version,
            variant=job.variant or "", role=job.role or "",
            status="ok" if error is None else ("expired" if error.code == codec.EXPIRED
                                               else "error"),
            outputs=outputs, error=codec.ErrorInfo(error.code, error.message) if error else None,
            total_ms=round(now_ms() - job.origin.timestamp_ms, 3),
        )  # fmt: skip
        key = job.request.id.encode()
        return job.origin, [Record(self.settings.shadow_topic, key, codec.encode(record), [])]

    def _responses(
        self, model: str, version: str, outputs: list[np.ndarray], metas: list[codec.ResultRecord]
    ) -> list[bytes]:
        """Encoded ok responses for a batch: ``outputs[k]`` holds output k for every row."""
        config = self.registry.config(model, version)
        n = len(metas)
        binary = [m.fmt == codec.MSGPACK for m in metas]
        raw: list[tuple[str, Any, list[int], Any, np.ndarray | None]] = []
        for spec, out in zip(config.outputs, outputs, strict=False):
            flat = out.reshape(n, -1)
            if out.dtype == np.object_:  # BYTES (a handler's strings): lists in both formats
                strings = [[_text(v) for v in row] for row in flat.tolist()]
                raw.append((spec.name, "BYTES", list(out.shape[1:]), strings, None))
                continue
            # Lists for JSON, little-endian bytes for MessagePack: each made once per batch.
            lists = flat.tolist() if not all(binary) else None
            le = np.ascontiguousarray(flat, flat.dtype.newbyteorder("<")) if any(binary) else None
            raw.append((spec.name, codec.DATATYPE_OF[out.dtype], list(out.shape[1:]), lists, le))
        top = _top_k(config.labels, outputs, [m.top_k or 1 for m in metas])
        done = now_ms()
        # The timings of the whole batch at once, a column each, rounded to the microsecond.
        queue, inference, total = np.array(
            [[m.started_ms - m.received_ms for m in metas], [m.inference_ms for m in metas],
             [done - m.produced_ms for m in metas]],
            np.float64,
        ).round(3).tolist()  # fmt: skip
        answers = Answers(model, version, raw, top, (queue, inference, total), metas)
        if not any(binary) and all(m.parameters is None and m.variant is None for m in metas):
            values = _json_answers(answers)
        else:
            values = _answers(answers, binary)
        if all(m.variant is None for m in metas):
            self._count_many(model, version, "ok", [m.produced_ms for m in metas])
            return values
        by_variant: dict[str | None, list[float]] = {}
        for m in metas:  # two variants may serve one version (an A/A test)
            by_variant.setdefault(m.variant, []).append(m.produced_ms)
        for variant, produced_ms in by_variant.items():
            self._counted(model, version, "ok", produced_ms, variant)
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
        # Answered from the cache, never counted in flight; the shadow is not asked.
        job.mirror = None
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
            variant=job.variant,
        )  # fmt: skip
        topic = request.reply_to or self.settings.responses_topic
        record = Record(topic, request.id.encode(), codec.encode(response, fmt),
                        origin.correlation_headers())  # fmt: skip
        self._counted(model.name, model.version, "ok", [origin.timestamp_ms], job.variant)
        return origin, [record]

    def _fill_result(self, job: Job, rows: list[np.ndarray]) -> None:
        if self.results is None or job.result_key is None:
            return
        names = [spec.name for spec in job.model.config.outputs]
        self.results.put(
            job.result_key, job.model.name, job.model.version,
            list(zip(names, rows, strict=False)),
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Answers:
    """A batch's ok answers before encoding: ``raw`` holds per output (name, datatype,
    shape, each row's data as lists, each row's little-endian array), ``top`` each row's
    labels and scores (classifiers), ``times`` the rows' queue, inference and total ms (a
    column each)."""

    model: str
    version: str
    raw: list[tuple[str, Any, list[int], Any, np.ndarray | None]]
    top: list[tuple[list[str], list[float]]] | None
    times: tuple[list[float], list[float], list[float]]
    metas: list[codec.ResultRecord]

    def fields(self) -> tuple[Any, ...]:
        return self.model, self.version, self.raw, self.top, self.times, self.metas


def _answers(answers: Answers, binary: list[bool]) -> list[bytes]:
    """A batch's ok responses, each a `Response` encoded in its request's format."""
    model, version, raw, top, times, metas = answers.fields()
    values = []
    for i, meta in enumerate(metas):
        tensors = [
            Tensor(name, dt, shape, le[i].tobytes() if binary[i] and le is not None
                   else lists[i])  # type: ignore[index]
            for name, dt, shape, lists, le in raw
        ]  # fmt: skip
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
                queue_ms=times[0][i],
                inference_ms=times[1][i],
                total_ms=times[2][i],
                batch_size=meta.batch_size,
            ),
            parameters=meta.parameters,
            variant=meta.variant,
        )
        values.append(codec.encode(response, meta.fmt))
    return values


def _json_answers(answers: Answers) -> list[bytes]:
    """The same bytes as `_answers` for a batch of JSON requests without parameters or
    variant: what every answer shares is encoded once, what each has is encoded a column at
    a time (one call per column), and the pieces joined per answer."""
    model, version, raw, top, times, metas = answers.fields()
    enc, column = codec.encode, codec.encode_lines
    parts: list[list[bytes] | bytes] = [b'{"id":', column([m.id for m in metas])]
    opening = b',"status":"ok","model":%s,"model_version":%s,"outputs":['
    parts.append(opening % (enc(model), enc(version)))
    sep = b""
    for name, datatype, shape, lists, _ in raw:
        head = b'{"name":%s,"datatype":%s,"shape":%s,"data":'
        parts += [sep + head % (enc(name), enc(datatype), enc(shape)), column(lists), b"}"]
        sep = b","
    if top is not None:
        ks = column([len(labels) for labels, _ in top])
        parts += [sep + b'{"name":"labels","datatype":"BYTES","shape":[', ks, b'],"data":']
        parts += [column([labels for labels, _ in top])]
        parts += [b'},{"name":"scores","datatype":"FP32","shape":[', ks, b'],"data":']
        parts += [column([scores for _, scores in top]), b"}"]
    queue, inference, total = times
    parts += [b'],"timings":{"queue_ms":', column(queue), b',"inference_ms":', column(inference)]
    parts += [b',"total_ms":', column(total), b',"batch_size":']
    parts += [column([m.batch_size for m in metas]), b"}}"]
    # Each answer: the shared pieces (repeated) and its cell of each column, in order.
    pieces = [repeat(p) if isinstance(p, bytes) else p for p in parts]
    return [b"".join(row) for row in zip(*pieces, strict=False)]  # the columns end it


def _results(outcomes: Sequence[Outcome]) -> list[codec.ResultRecord]:
    """What each answer is made from, for a run of one batch's outcomes (the model, its
    version and the batch's figures shared)."""
    first = outcomes[0]
    model = first.job.model
    name, version = model.name, model.version
    json = codec.JSON
    out = []
    for o in outcomes:
        job = o.job
        request, origin = job.request, job.origin
        params = request.parameters
        out.append(
            codec.ResultRecord(
                id=request.id,
                model=name,
                model_version=version,
                outputs=[],
                reply_to=request.reply_to,
                top_k=params.top_k if params is not None else None,
                fmt=codec.content_type(origin.headers) if origin.headers else json,
                produced_ms=origin.timestamp_ms,
                received_ms=job.received_ms,
                started_ms=job.started_ms,
                inference_ms=o.inference_ms,
                batch_size=o.batch_size,
                parameters=o.parameters,
                variant=job.variant,
                role=job.role,
            )
        )
    return out


def _result_array(tensor: Tensor) -> np.ndarray:
    """A results-topic output as one row (BYTES outputs as strings)."""
    if tensor.datatype == "BYTES" and isinstance(tensor.data, list):
        return np.array(tensor.data, dtype=object).reshape(1, *tensor.shape)
    return codec.tensor_to_array(tensor, 1 << 62)[None]


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


def _groups(outcomes: Sequence[Outcome]) -> list[list[Outcome]]:
    """Runs of outcomes that are all errors, or all rows of one batch's outputs."""
    shared = outcomes[0].batch_outputs if outcomes else None
    if shared is not None and all(o.batch_outputs is shared for o in outcomes):
        return [list(outcomes)]  # the usual: one batch, no errors
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
    own = [o.outputs or [] for o in group]
    return [np.stack([r[k] for r in own]) for k in range(len(own[0]))]


def _top_k(
    labels: Sequence[str], outputs: list[np.ndarray], ks: list[int]
) -> list[tuple[list[str], list[float]]] | None:
    """Softmax top-k labels and scores per row, for classifiers (models with labels)."""
    if not labels or not outputs:
        return None
    logits = outputs[0].reshape(len(ks), -1).astype(np.float64)
    if logits.shape[1] != len(labels):
        return None
    # The ufuncs' reductions: ``max`` and ``sum`` add a Python call each (a small batch's).
    probs = np.exp(logits - np.maximum.reduce(logits, axis=1, keepdims=True))
    probs /= np.add.reduce(probs, axis=1, keepdims=True)
    if max(ks) == 1:  # the usual case: the best label alone (argmax keeps the first of ties)
        best = probs.argmax(axis=1)
        top = probs[np.arange(len(ks)), best].astype(np.float32).tolist()
        return [([labels[j]], [s]) for j, s in zip(best.tolist(), top, strict=True)]
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
