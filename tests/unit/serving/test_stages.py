"""The pipeline's stages as library calls, with a recording sink in place of Kafka."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import numpy as np
import pytest
import torch

from pipeline.config import Settings
from pipeline.models import DEMO_FEATURES, DEMO_LABELS, LoadedModel, ModelRegistry
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.protocol.codec import DlqRecord, ResultRecord
from pipeline.serving import (
    ORIGIN_HEADER,
    Job,
    Origin,
    Outcome,
    Pipeline,
    now_ms,
    postprocess,
)

T = TypeVar("T")
POISON = 666.0


@dataclass
class Sent:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes]]

    def header(self, name: str) -> bytes | None:
        return dict(self.headers).get(name)


@dataclass
class FakeSink:
    """Records what is published; each publish returns a delivery future.

    Completed at once by default; with ``manual`` set, left pending for the test to settle.
    """

    manual: bool = False
    sent: list[Sent] = field(default_factory=list)
    deliveries: list[asyncio.Future[None]] = field(default_factory=list)

    async def __call__(
        self, topic: str, key: bytes | None, value: bytes, headers: list[tuple[str, bytes]] | None
    ) -> Awaitable[Any]:
        self.sent.append(Sent(topic, key, value, list(headers or [])))
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if not self.manual:
            future.set_result(None)
        self.deliveries.append(future)
        return future

    def to(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]


@dataclass
class Env:
    settings: Settings
    registry: ModelRegistry
    sink: FakeSink
    metrics: Metrics
    pipeline: Pipeline

    def sample(self, name: str, **labels: str) -> float:
        if name.startswith(("sluice_requests_total", "sluice_request_latency")):
            labels.setdefault("variant", "")  # outside any experiment
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def responses(self) -> list[Sent]:
        return self.sink.to(self.settings.responses_topic)

    def dlq(self) -> list[DlqRecord]:
        return [codec.decode_dlq(s.value) for s in self.sink.to(self.settings.dlq_topic)]


def make_env(
    model_dir: Path, tmp_path: Path, sink: FakeSink | None = None, **overrides: Any
) -> Env:
    settings = Settings(cache_dir=tmp_path, model_dir=model_dir, topic_prefix="t", **overrides)
    registry = ModelRegistry(settings.models_path, device=torch.device("cpu"))
    sink = sink or FakeSink()
    metrics = Metrics()
    return Env(settings, registry, sink, metrics, Pipeline(settings, registry, sink, metrics))


@pytest.fixture
def env(demo_dir: Path, tmp_path: Path) -> Env:
    return make_env(demo_dir, tmp_path)


def run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await coro_fn()

    return asyncio.run(main())


def feature_row(seed: int, first: float | None = None) -> list[float]:
    row = np.random.default_rng(seed).standard_normal(DEMO_FEATURES).astype(np.float32)
    if first is not None:
        row[0] = first
    return [float(v) for v in row]


def request(rid: str = "r1", seed: int = 0, first: float | None = None, **fields: Any) -> bytes:
    doc: dict[str, Any] = {
        "id": rid,
        "model": "demo",
        "inputs": [
            {
                "name": "features",
                "datatype": "FP32",
                "shape": [1, DEMO_FEATURES],
                "data": feature_row(seed, first),
            }
        ],
    }
    doc.update(fields)
    return json.dumps({k: v for k, v in doc.items() if v is not None}).encode()


HEADERS = [
    ("correlation-id", b"corr-42"),
    ("traceparent", b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
    ("x-private", b"not copied"),
]


class Acks:
    def __init__(self) -> None:
        self.calls: list[int] = []

    def for_offset(self, offset: int) -> Callable[[], None]:
        return lambda: self.calls.append(offset)


def origin(
    value: bytes | None,
    offset: int = 0,
    headers: list[tuple[str, bytes]] | None = None,
    ack: Callable[[], Any] | None = None,
    timestamp_ms: float | None = None,
    topic: str = "t.requests",
) -> Origin:
    return Origin(
        topic=topic,
        partition=2,
        offset=offset,
        timestamp_ms=now_ms() if timestamp_ms is None else timestamp_ms,
        value=value,
        headers=list(HEADERS if headers is None else headers),
        ack=ack,
    )


def direct_logits(
    registry: ModelRegistry, rows: Sequence[list[float]], version: str = "2"
) -> np.ndarray:
    [out] = registry.resolve("demo", version).run([np.array(rows, dtype=np.float32)])
    return out


async def fused(env: Env, origins: Sequence[Origin]) -> list[Job]:
    """Gateway, then one batch through infer and respond (what the fused worker does)."""
    jobs = [j for j in [await env.pipeline.gateway(o) for o in origins] if j is not None]
    if jobs:
        await env.pipeline.respond(env.pipeline.infer(jobs))
    await env.pipeline.drain()
    return jobs


def decode(sent: Sent) -> codec.Response:
    return codec.decode_response(sent.value)


def logits_of(response: codec.Response) -> np.ndarray:
    assert response.outputs is not None
    [t] = [t for t in response.outputs if t.name == "logits"]
    assert t.datatype == "FP32"
    return np.array(t.data, dtype=np.float32).reshape(t.shape)


# -- the happy path -------------------------------------------------------------------------


def test_ok_response_equals_the_model_output(env: Env) -> None:
    acks = Acks()
    o = origin(request("r1", seed=1), offset=7, ack=acks.for_offset(7))
    jobs = run(lambda: fused(env, [o]))
    assert len(jobs) == 1
    [sent] = env.sink.sent
    assert sent.topic == "t.responses" == env.settings.responses_topic
    assert sent.key == b"r1"
    response = decode(sent)
    assert response.id == "r1"
    assert response.status == "ok"
    assert (response.model, response.model_version) == ("demo", "2")
    assert response.error is None
    logits = logits_of(response)
    assert logits.shape == (len(DEMO_LABELS),)  # the model's per-example output shape
    np.testing.assert_allclose(
        logits, direct_logits(env.registry, [feature_row(1)])[0], rtol=1e-6, atol=1e-6
    )
    assert response.timings is not None and response.timings.batch_size == 1
    assert response.timings.total_ms >= 0 and response.timings.queue_ms >= 0
    assert acks.calls == [7]


def test_correlation_headers_are_copied_and_nothing_else(env: Env) -> None:
    run(lambda: fused(env, [origin(request())]))
    [sent] = env.sink.sent
    assert sent.header("correlation-id") == b"corr-42"
    assert sent.header("traceparent") == dict(HEADERS)["traceparent"]
    assert sent.header("x-private") is None


def test_labels_and_scores_follow_the_logits(env: Env) -> None:
    run(lambda: fused(env, [origin(request(parameters={"top_k": 3}))]))
    response = decode(env.sink.sent[0])
    assert response.outputs is not None
    by_name = {t.name: t for t in response.outputs}
    assert set(by_name) == {"logits", "labels", "scores"}
    logits = np.array(by_name["logits"].data, dtype=np.float64).reshape(-1)
    order = np.argsort(-logits, kind="stable")[:3]
    assert by_name["labels"].data == [DEMO_LABELS[i] for i in order]
    assert by_name["labels"].datatype == "BYTES"
    scores = by_name["scores"].data
    assert scores == sorted(scores, reverse=True)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    # The pipeline's softmax runs in float32, this one in float64.
    np.testing.assert_allclose(scores, probs[order], rtol=1e-6, atol=1e-7)


def test_named_version_is_used(env: Env) -> None:
    run(lambda: fused(env, [origin(request(seed=3, version="1"))]))
    response = decode(env.sink.sent[0])
    assert response.model_version == "1"
    np.testing.assert_allclose(
        logits_of(response).reshape(-1),
        direct_logits(env.registry, [feature_row(3)], "1")[0],
        rtol=1e-6,
        atol=1e-6,
    )


def test_reply_to_routes_the_response(env: Env) -> None:
    run(lambda: fused(env, [origin(request("r9", reply_to="t.replies.client-7"))]))
    [sent] = env.sink.sent
    assert sent.topic == "t.replies.client-7"
    assert sent.key == b"r9"
    assert decode(sent).status == "ok"
    assert env.responses() == []


@pytest.mark.parametrize(
    "topic",
    ["__consumer_offsets", "elsewhere", "sluice.requests", "t.dlq", "t.features-changelog",
     "other-team.replies", "t.replies-not"],
)  # fmt: skip
def test_a_reply_to_off_the_allowlist_is_refused_and_answered_on_the_default_topic(
    env: Env, topic: str
) -> None:
    run(lambda: fused(env, [origin(request("r8", reply_to=topic))]))
    assert sorted(s.topic for s in env.sink.sent) == ["t.dlq", "t.responses"]
    [sent] = env.responses()
    answer = decode(sent)
    assert answer.status == "error" and answer.error is not None
    assert answer.error.code == "forbidden_reply_to"
    assert "not an allowed reply topic" in answer.error.message
    [dlq] = [s for s in env.sink.sent if s.topic.endswith(".dlq")]
    assert codec.decode_dlq(dlq.value).reason == "forbidden_reply_to"
    assert env.sample("sluice_dlq_total", reason="forbidden_reply_to") == 1


@pytest.mark.parametrize(
    ("key_bytes", "headers", "reason"),
    [
        (1_048_576, [], "key_too_large"),
        (0, [("x-flood", b"1")] * 1_000, "too_many_headers"),
        (0, [("big", b"x" * 70_000)], "too_many_headers"),
        (0, [("traceparent", b"00-ab-cd-01")] * 1_000, "too_many_headers"),
    ],
)
def test_a_key_or_headers_past_their_limits_are_refused_and_answered(
    env: Env, key_bytes: int, headers: list[tuple[str, bytes]], reason: str
) -> None:
    bad = origin(request("e1"), headers=headers)
    bad.key_bytes = key_bytes
    run(lambda: fused(env, [bad, origin(request("e2"), offset=1)]))
    answers = {decode(s).id: decode(s) for s in env.responses()}
    assert answers["e2"].status == "ok"
    error = answers["e1"].error
    assert answers["e1"].status == "error" and error is not None and error.code == reason
    [dlq] = [s for s in env.sink.sent if s.topic.endswith(".dlq")]
    assert codec.decode_dlq(dlq.value).reason == reason
    # However many came, an answer carries at most one header of each correlation name.
    assert len(next(s for s in env.responses() if decode(s).id == "e1").headers) <= 1


def test_response_topic_setting(demo_dir: Path, tmp_path: Path) -> None:
    e = make_env(demo_dir, tmp_path, responses_topic_name="answers")
    run(lambda: fused(e, [origin(request())]))
    assert [s.topic for s in e.sink.sent] == ["answers"]


def test_a_batch_answers_every_request_with_its_own_row(env: Env) -> None:
    origins = [origin(request(f"r{i}", seed=i), offset=i) for i in range(6)]
    run(lambda: fused(env, origins))
    responses = {decode(s).id: decode(s) for s in env.responses()}
    assert set(responses) == {f"r{i}" for i in range(6)}
    expected = direct_logits(env.registry, [feature_row(i) for i in range(6)])
    for i in range(6):
        r = responses[f"r{i}"]
        assert r.timings is not None and r.timings.batch_size == 6
        np.testing.assert_allclose(logits_of(r).reshape(-1), expected[i], rtol=1e-5, atol=1e-6)


def test_inflight_gauge_returns_to_zero(env: Env) -> None:
    async def main() -> None:
        jobs = [await env.pipeline.gateway(origin(request(f"r{i}"))) for i in range(3)]
        assert env.sample("sluice_inflight_requests") == 3
        await env.pipeline.respond(env.pipeline.infer([j for j in jobs if j is not None]))
        await env.pipeline.drain()

    run(main)
    assert env.sample("sluice_inflight_requests") == 0


# -- bad input: DLQ and, when the requester is known, an error response --------------------


def fp32(shape: list[int], data: list[Any], name: str = "features", dt: str = "FP32") -> Any:
    return [{"name": name, "datatype": dt, "shape": shape, "data": data}]


@pytest.mark.parametrize(
    ("value", "reason", "request_id"),
    [
        (b"{not json", "malformed", None),
        (None, "malformed", None),
        (b"\xff\xfe\x00", "malformed", None),
        (request("big", pad="x" * 5000), "oversize", None),
        (json.dumps({"id": "s1", "model": "demo"}).encode(), "schema", "s1"),
        (request("s2", inputs=[]), "schema", "s2"),
        (request("s3", model="no such model!"), "schema", "s3"),
        (request("u1", model="nope"), "unknown_model", "u1"),
        (request("u2", version="9"), "unknown_version", "u2"),
        (request("b1", inputs=fp32([DEMO_FEATURES + 1], [0.0] * 17)), "bad_shape", "b1"),
        (request("b2", inputs=fp32([DEMO_FEATURES], [0.0] * 15)), "bad_shape", "b2"),
        (request("b3", inputs=fp32([DEMO_FEATURES], [0.0] * 16, name="pixels")), "bad_shape", "b3"),
        (request("d1", inputs=fp32([DEMO_FEATURES], [0] * 16, dt="INT32")), "bad_dtype", "d1"),
        (request("d2", inputs=fp32([DEMO_FEATURES], ["a"] * 16)), "bad_dtype", "d2"),
        (request("e1", deadline_ms=1), "expired", "e1"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_bad_input_is_dead_lettered(
    demo_dir: Path, tmp_path: Path, value: bytes | None, reason: str, request_id: str | None
) -> None:
    e = make_env(demo_dir, tmp_path, max_payload_bytes=4096)
    acks = Acks()
    o = origin(value, offset=11, ack=acks.for_offset(11))

    async def main() -> Job | None:
        job = await e.pipeline.gateway(o)
        await e.pipeline.drain()
        return job

    assert run(main) is None
    [dlq] = e.dlq()
    assert e.sink.to(e.settings.dlq_topic)[0].key == (request_id.encode() if request_id else None)
    assert dlq.reason == reason
    assert dlq.stage == "gateway"
    assert (dlq.topic, dlq.partition, dlq.offset) == ("t.requests", 2, 11)
    assert base64.b64decode(dlq.original_b64) == (value or b"")
    assert dlq.request_id == request_id
    assert dlq.error
    responses = e.responses()
    if request_id is None:
        assert responses == []
    else:
        [sent] = responses
        assert sent.key == request_id.encode()
        assert sent.header("correlation-id") == b"corr-42"
        response = decode(sent)
        assert response.id == request_id
        assert response.status == ("expired" if reason == "expired" else "error")
        assert response.error is not None and response.error.code == reason
        assert response.outputs is None
    assert e.sample("sluice_dlq_total", reason=reason) == 1
    assert acks.calls == [11]
    assert e.sample("sluice_inflight_requests") == 0


def test_error_response_goes_to_reply_to(env: Env) -> None:
    run(lambda: fused(env, [origin(request("u3", model="nope", reply_to="t.replies"))]))
    assert [s.topic for s in env.sink.sent] == ["t.dlq", "t.replies"]
    assert decode(env.sink.sent[1]).error.code == "unknown_model"  # type: ignore[union-attr]


def test_schema_error_is_answered_on_salvaged_reply_to(env: Env) -> None:
    run(lambda: fused(env, [origin(request("s4", inputs=[], reply_to="t.replies.a"))]))
    assert [s.topic for s in env.sink.sent] == ["t.dlq", "t.replies.a"]


# -- deadlines ------------------------------------------------------------------------------


@pytest.fixture
def model_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts rows passed to LoadedModel.run (warm-up included)."""
    calls: list[int] = []
    original = LoadedModel.run

    def counting(self: LoadedModel, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        calls.append(len(batch[0]))
        return original(self, batch)

    monkeypatch.setattr(LoadedModel, "run", counting)
    return calls


def test_expired_at_the_gateway_never_runs_the_model(env: Env, model_calls: list[int]) -> None:
    env.registry.resolve("demo")  # loaded (and warmed up) beforehand
    model_calls.clear()
    run(lambda: fused(env, [origin(request("x1", deadline_ms=int(now_ms()) - 1000))]))
    [sent] = env.responses()
    response = decode(sent)
    assert response.status == "expired"
    assert response.error is not None and response.error.code == "expired"
    assert [d.reason for d in env.dlq()] == ["expired"]
    assert model_calls == []
    assert env.sample("sluice_requests_total", model="demo", version="2", outcome="expired") == 1


def test_ttl_counts_from_the_record_timestamp(env: Env, model_calls: list[int]) -> None:
    env.registry.resolve("demo")
    model_calls.clear()
    old = now_ms() - 10_000
    run(lambda: fused(env, [origin(request("x2", ttl_ms=5_000), timestamp_ms=old)]))
    assert decode(env.responses()[0]).status == "expired"
    assert model_calls == []


def test_default_ttl_applies_without_deadline(demo_dir: Path, tmp_path: Path) -> None:
    e = make_env(demo_dir, tmp_path, default_ttl_ms=1000)
    old = now_ms() - 5000
    run(
        lambda: fused(e, [origin(request("x3"), timestamp_ms=old), origin(request("x4"), offset=1)])
    )
    statuses = {decode(s).id: decode(s).status for s in e.responses()}
    assert statuses == {"x3": "expired", "x4": "ok"}


def test_expired_while_queued_is_answered_without_running(env: Env, model_calls: list[int]) -> None:
    env.registry.resolve("demo")
    model_calls.clear()

    async def main() -> None:
        deadline = int(now_ms()) + 100
        stale = await env.pipeline.gateway(origin(request("late", deadline_ms=deadline)))
        fresh = await env.pipeline.gateway(origin(request("fresh", seed=5), offset=1))
        assert stale is not None and fresh is not None
        await asyncio.sleep(0.15)  # the deadline passes while the job waits for its batch
        outcomes = env.pipeline.infer([stale, fresh])
        await env.pipeline.respond(outcomes)
        await env.pipeline.drain()

    run(main)
    assert model_calls == [1]  # only the fresh request was computed
    statuses = {decode(s).id: decode(s).status for s in env.responses()}
    assert statuses == {"late": "expired", "fresh": "ok"}
    [dlq] = env.dlq()
    assert (dlq.reason, dlq.stage, dlq.request_id) == ("expired", "infer", "late")
    assert env.sample("sluice_requests_total", model="demo", version="2", outcome="expired") == 1


# -- a poison request fails alone -----------------------------------------------------------


@pytest.fixture
def poisonable(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """LoadedModel.run raises when any row's first feature is POISON; records batch sizes."""
    sizes: list[int] = []
    original = LoadedModel.run

    def run_or_fail(self: LoadedModel, batch: Sequence[np.ndarray]) -> list[np.ndarray]:
        sizes.append(len(batch[0]))
        if np.any(batch[0][:, 0] == POISON):
            raise ValueError("poisoned input")
        return original(self, batch)

    monkeypatch.setattr(LoadedModel, "run", run_or_fail)
    return sizes


@pytest.mark.parametrize("poisoned", [{5}, {0, 7}, {3}, set(range(8))])
def test_poison_request_fails_alone(env: Env, poisonable: list[int], poisoned: set[int]) -> None:
    env.registry.resolve("demo")
    poisonable.clear()
    origins = [
        origin(request(f"r{i}", seed=i, first=POISON if i in poisoned else None), offset=i)
        for i in range(8)
    ]
    run(lambda: fused(env, origins))
    responses = {decode(s).id: decode(s) for s in env.responses()}
    assert set(responses) == {f"r{i}" for i in range(8)}
    expected = direct_logits(env.registry, [feature_row(i) for i in range(8)])
    for i in range(8):
        r = responses[f"r{i}"]
        if i in poisoned:
            assert r.status == "error"
            assert r.error is not None and r.error.code == "model_error"
            assert "poisoned input" in r.error.message
        else:
            assert r.status == "ok", r
            np.testing.assert_allclose(logits_of(r).reshape(-1), expected[i], rtol=1e-5, atol=1e-6)
    dlq = env.dlq()
    assert sorted(d.request_id or "" for d in dlq) == sorted(f"r{i}" for i in poisoned)
    assert {(d.reason, d.stage) for d in dlq} == {("model_error", "infer")}
    assert poisonable[0] == 8
    assert env.sample("sluice_dlq_total", reason="model_error") == len(poisoned)
    ok = env.sample("sluice_requests_total", model="demo", version="2", outcome="ok")
    err = env.sample("sluice_requests_total", model="demo", version="2", outcome="error")
    assert (ok, err) == (8 - len(poisoned), len(poisoned))


# -- acking ---------------------------------------------------------------------------------


def test_ack_waits_for_delivery(demo_dir: Path, tmp_path: Path) -> None:
    e = make_env(demo_dir, tmp_path, sink=FakeSink(manual=True))
    acks = Acks()

    async def main() -> None:
        job = await e.pipeline.gateway(origin(request("a1"), offset=3, ack=acks.for_offset(3)))
        assert job is not None
        await e.pipeline.respond(e.pipeline.infer([job]))
        await asyncio.sleep(0.01)
        assert len(e.sink.sent) == 1
        assert acks.calls == []  # published, not yet delivered
        e.sink.deliveries[0].set_result(None)
        await e.pipeline.drain()
        assert acks.calls == [3]

    run(main)


def test_rejected_record_is_acked_after_both_dlq_and_response(
    demo_dir: Path, tmp_path: Path
) -> None:
    e = make_env(demo_dir, tmp_path, sink=FakeSink(manual=True))
    acks = Acks()

    async def main() -> None:
        await e.pipeline.gateway(
            origin(request("u1", model="nope"), offset=4, ack=acks.for_offset(4))
        )
        assert [s.topic for s in e.sink.sent] == ["t.dlq", "t.responses"]
        e.sink.deliveries[1].set_result(None)
        await asyncio.sleep(0.01)
        assert acks.calls == []  # the DLQ record is not on the broker yet
        e.sink.deliveries[0].set_result(None)
        await e.pipeline.drain()
        assert acks.calls == [4]

    run(main)


def test_failed_delivery_is_not_acked(
    demo_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    e = make_env(demo_dir, tmp_path, sink=FakeSink(manual=True))
    acks = Acks()

    async def main() -> None:
        job = await e.pipeline.gateway(origin(request("f1"), offset=5, ack=acks.for_offset(5)))
        assert job is not None
        await e.pipeline.respond(e.pipeline.infer([job]))
        e.sink.deliveries[0].set_exception(RuntimeError("broker said no"))
        await e.pipeline.drain()

    run(main)
    assert acks.calls == []
    assert "left unacked" in caplog.text


def test_async_ack_is_awaited(env: Env) -> None:
    acked: list[str] = []

    async def ack() -> None:
        await asyncio.sleep(0)
        acked.append("done")

    run(lambda: fused(env, [origin(request(), ack=ack)]))
    assert acked == ["done"]


def test_each_record_is_acked_once(env: Env) -> None:
    acks = Acks()
    origins = [
        origin(request(f"r{i}", seed=i), offset=i, ack=acks.for_offset(i)) for i in range(4)
    ] + [origin(b"junk", offset=4, ack=acks.for_offset(4))]
    run(lambda: fused(env, origins))
    assert sorted(acks.calls) == [0, 1, 2, 3, 4]


# -- metrics --------------------------------------------------------------------------------


def test_request_and_dlq_counters(env: Env) -> None:
    origins = [
        origin(request("ok1", seed=1)),
        origin(request("ok2", seed=2)),
        origin(request("ok3", seed=3, version="1")),
        origin(b"nonsense"),
        origin(request("um", model="nope")),
        origin(request("uv", version="7")),
        origin(request("bs", version="1", inputs=fp32([3], [1.0, 2.0, 3.0]))),
        origin(request("ex", deadline_ms=1)),
    ]
    run(lambda: fused(env, origins))
    s = env.sample
    assert s("sluice_requests_total", model="demo", version="2", outcome="ok") == 2
    assert s("sluice_requests_total", model="demo", version="1", outcome="ok") == 1
    assert s("sluice_requests_total", model="unknown", version="", outcome="error") == 2
    assert s("sluice_requests_total", model="demo", version="", outcome="error") == 1  # uv
    assert s("sluice_requests_total", model="demo", version="1", outcome="error") == 1
    assert s("sluice_requests_total", model="demo", version="2", outcome="expired") == 1
    for reason, count in [
        ("malformed", 1),
        ("unknown_model", 1),
        ("unknown_version", 1),
        ("bad_shape", 1),
        ("expired", 1),
        ("schema", 0),
    ]:
        assert s("sluice_dlq_total", reason=reason) == count, reason
    # Per-model batch histogram: version 1 and version 2 ran as separate batches.
    assert s("sluice_batch_size_count", model="demo") >= 1
    assert (
        s("sluice_request_latency_seconds_count", model="demo", version="2", stage="respond") == 3
    )


def test_unknown_model_names_do_not_become_labels(env: Env) -> None:
    run(lambda: fused(env, [origin(request(f"u{i}", model=f"m{i}")) for i in range(5)]))
    samples = [
        sample.labels
        for metric in env.metrics.registry.collect()
        if metric.name == "sluice_requests"
        for sample in metric.samples
        if sample.name == "sluice_requests_total"
    ]
    assert samples == [{"model": "unknown", "version": "", "outcome": "error", "variant": ""}]


def test_metrics_are_per_instance() -> None:
    a, b = Metrics(), Metrics()
    a.dlq.labels("schema").inc()
    assert a.registry.get_sample_value("sluice_dlq_total", {"reason": "schema"}) == 1
    assert b.registry.get_sample_value("sluice_dlq_total", {"reason": "schema"}) is None


# -- split mode -----------------------------------------------------------------------------


def test_split_path_gives_the_fused_response(demo_dir: Path, tmp_path: Path) -> None:
    raw = request("sp1", seed=9, parameters={"top_k": 2}, key="user-3")
    headers = HEADERS

    fused_env = make_env(demo_dir, tmp_path / "fused")
    run(lambda: fused(fused_env, [origin(raw, headers=headers)]))
    [fused_sent] = fused_env.responses()

    e = make_env(demo_dir, tmp_path / "split")
    acks = Acks()

    async def main() -> None:
        p = e.pipeline
        # Gateway: admit and forward to the model's infer topic.
        job = await p.gateway(origin(raw, offset=21, headers=headers, ack=acks.for_offset(21)))
        assert job is not None
        await p.forward(job)
        [fwd] = e.sink.sent
        assert fwd.topic == "t.infer.demo" == e.settings.infer_topic("demo")
        assert fwd.key == b"user-3"
        assert fwd.value == raw
        assert fwd.header(ORIGIN_HEADER) == b"t.requests:2:21"
        assert fwd.header("correlation-id") == b"corr-42"
        # Infer: admit again from the infer topic, run, publish raw results.
        infer_origin = origin(
            fwd.value, offset=0, headers=fwd.headers, topic=fwd.topic, ack=acks.for_offset(100)
        )
        job2 = await p.gateway(infer_origin)
        assert job2 is not None
        await p.publish_results(p.infer([job2]))
        result_sent = e.sink.sent[1]
        assert result_sent.topic == "t.results"
        assert result_sent.key == b"sp1"
        assert result_sent.header(ORIGIN_HEADER) == b"t.infer.demo:2:0"
        result = codec.decode_result(result_sent.value)
        assert (result.id, result.model, result.model_version, result.top_k) == (
            "sp1",
            "demo",
            "2",
            2,
        )
        # Respond: postprocess and answer.
        await p.respond_record(
            origin(
                result_sent.value,
                offset=0,
                headers=result_sent.headers,
                topic="t.results",
                ack=acks.for_offset(200),
            )
        )
        await p.drain()

    run(main)
    [split_sent] = e.responses()
    assert sorted(acks.calls) == [21, 100, 200]
    assert split_sent.key == fused_sent.key == b"sp1"
    assert split_sent.header("correlation-id") == fused_sent.header("correlation-id")
    assert split_sent.header("traceparent") == fused_sent.header("traceparent")
    split_resp, fused_resp = decode(split_sent), decode(fused_sent)
    assert split_resp.timings is not None and split_resp.timings.batch_size == 1
    split_resp.timings = fused_resp.timings = None
    assert split_resp == fused_resp
    assert split_resp.outputs is not None
    assert [t.name for t in split_resp.outputs] == ["logits", "labels", "scores"]
    assert len(split_resp.outputs[1].data) == 2


def test_split_path_poison_goes_to_dlq_from_infer(
    demo_dir: Path, tmp_path: Path, poisonable: list[int]
) -> None:
    e = make_env(demo_dir, tmp_path)

    async def main() -> None:
        jobs = [
            await e.pipeline.gateway(
                origin(request(f"r{i}", seed=i, first=POISON if i == 1 else None), offset=i)
            )
            for i in range(3)
        ]
        await e.pipeline.publish_results(e.pipeline.infer([j for j in jobs if j]))
        await e.pipeline.drain()

    run(main)
    assert [codec.decode_result(s.value).id for s in e.sink.to("t.results")] == ["r0", "r2"]
    [dlq] = e.dlq()
    assert (dlq.request_id, dlq.reason, dlq.stage) == ("r1", "model_error", "infer")
    assert decode(e.responses()[0]).status == "error"


def test_respond_record_dead_letters_a_malformed_result(env: Env) -> None:
    acks = Acks()
    run(
        lambda: respond_only(
            env, origin(b'{"id": 1}', topic="t.results", offset=8, ack=acks.for_offset(8))
        )
    )
    [dlq] = env.dlq()
    assert (dlq.reason, dlq.stage, dlq.topic, dlq.offset) == (
        "malformed",
        "respond",
        "t.results",
        8,
    )
    assert env.responses() == []
    assert acks.calls == [8]


def test_respond_record_dead_letters_bad_output_tensors(env: Env) -> None:
    result = ResultRecord(
        id="rr",
        model="demo",
        model_version="2",
        outputs=[
            codec.Tensor(name="logits", datatype="FP32", shape=[4], data=["a", "b", "c", "d"])
        ],
    )
    run(lambda: respond_only(env, origin(codec.encode(result), topic="t.results")))
    [dlq] = env.dlq()
    assert (dlq.reason, dlq.stage) == ("bad_dtype", "respond")


@pytest.mark.parametrize(("model", "version"), [("demo", "7"), ("gone", "1")])
def test_respond_record_for_a_model_it_does_not_know_is_dead_lettered(
    env: Env, model: str, version: str
) -> None:
    # The respond stage may run with a registry that has not seen a version the infer stage
    # served (or one since removed): that must end in the DLQ, not an exception out of the agent.
    result = ResultRecord(
        id="rk",
        model=model,
        model_version=version,
        outputs=[codec.array_to_tensor("logits", np.zeros(4, np.float32))],
    )
    acks = Acks()
    run(
        lambda: respond_only(
            env, origin(codec.encode(result), topic="t.results", offset=9, ack=acks.for_offset(9))
        )
    )
    [dlq] = env.dlq()
    assert dlq.stage == "respond"
    assert dlq.reason in ("unknown_model", "unknown_version")
    assert acks.calls == [9]


async def respond_only(env: Env, o: Origin) -> None:
    try:
        await env.pipeline.respond_record(o)
    except Exception as exc:  # noqa: BLE001 - a plain failure, not a traceback (see test_codec)
        pytest.fail(f"respond_record raised {type(exc).__name__}: {exc}")
    await env.pipeline.drain()


# -- a model that cannot be loaded ----------------------------------------------------------


def test_gateway_dead_letters_when_the_model_fails_to_load(
    demo_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A broken weights file on disk must not turn every request for it into an exception out
    # of the gateway agent; and the request itself was valid, so its requester is answered
    # (it has an id) and the reason is the model's fault, not "malformed".
    models = tmp_path / "models"
    shutil.copytree(demo_dir, models)
    (models / "demo" / "2" / "model.pt").write_bytes(b"corrupt")
    e = make_env(models, tmp_path)
    acks = Acks()

    async def main() -> Job | None:
        job = await e.pipeline.gateway(origin(request("ml"), ack=acks.for_offset(0)))
        await e.pipeline.drain()
        return job

    assert run(main) is None
    assert acks.calls == [0]
    [dlq] = e.dlq()
    assert dlq.stage == "gateway"
    assert "model.pt" in dlq.error
    assert dlq.reason == "model_error"
    assert (dlq.request_id, dlq.model) == ("ml", "demo")
    [sent] = e.responses()
    response = decode(sent)
    assert response.id == "ml" and response.status == "error"


# -- postprocess ----------------------------------------------------------------------------


def test_postprocess_top_k() -> None:
    logits = np.array([[0.0, 3.0, 1.0, 2.0]], dtype=np.float32)
    labels, scores = postprocess(DEMO_LABELS, [logits], 3)
    assert labels.data == ["east", "west", "south"]
    assert labels.shape == scores.shape == [3]
    assert scores.data == sorted(scores.data, reverse=True)
    assert 0 < sum(scores.data) < 1
    [top1, _] = postprocess(DEMO_LABELS, [logits], None)
    assert top1.data == ["east"]
    assert len(postprocess(DEMO_LABELS, [logits], 100)[0].data) == len(DEMO_LABELS)


def test_postprocess_skips_unlabelled_or_mismatched_outputs() -> None:
    assert postprocess((), [np.zeros(4)], 1) == []
    assert postprocess(DEMO_LABELS, [np.zeros(3)], 1) == []
    assert postprocess(DEMO_LABELS, [], 1) == []


def test_outcome_defaults() -> None:
    # An Outcome is either outputs or an error: the default is neither computed nor failed.
    job = Job(
        request=msgspec.json.decode(request(), type=codec.Request),
        model=None,  # type: ignore[arg-type]
        arrays=[],
        deadline_ms=None,
        origin=origin(b""),
        received_ms=time.time() * 1000,
    )
    out = Outcome(job)
    assert out.outputs is None and out.error is None and out.batch_size == 0


@pytest.mark.parametrize(
    "value",
    [
        b'{"id": "\xff", "model": "demo", "model_version": "2", "outputs": []}',
        b'{"id": "n", "model": "demo", "model_version": "2", "outputs": [{"name": "logits", '
        b'"datatype": "FP32", "shape": [4], "data": ' + b"[" * 10_000 + b"]" * 10_000 + b"}]}",
    ],
    ids=["invalid-utf8", "deeply-nested"],
)
def test_respond_record_dead_letters_undecodable_results(env: Env, value: bytes) -> None:
    run(lambda: respond_only(env, origin(value, topic="t.results")))
    [dlq] = env.dlq()
    assert (dlq.reason, dlq.stage) == ("malformed", "respond")
