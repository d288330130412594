"""Every class of bad input lands in the DLQ with its reason (and an answer where possible),
while good requests around it succeed and the worker keeps running."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.client import Client
from pipeline.kafka import consumer_config, ensure_topics, pipeline_topics, producer_config
from pipeline.protocol import codec
from tests.integration.conftest import demo_request, make_settings

GOOD = json.dumps(demo_request("x")).encode()


def _req(request_id: str, **changes: object) -> bytes:
    body = demo_request(request_id)
    body.update(changes)
    return json.dumps(body).encode()


def _tensor(**changes: object) -> list[dict]:  # type: ignore[type-arg]
    tensor = {"name": "features", "datatype": "FP32", "shape": [16], "data": [0.5] * 16}
    tensor.update(changes)
    return [tensor]


# (request id or None when unanswerable, raw bytes, DLQ reason, expected response status)
CASES = [
    (None, b"{not json", "malformed", None),
    (None, b'{"id": "\xff\xfe", "model": "demo"}', "malformed", None),
    (None, None, "malformed", None),
    ("bad-schema", b'{"id": "bad-schema", "model": "demo"}', "schema", "error"),
    ("bad-type", b'{"id": "bad-type", "model": "demo", "inputs": 5}', "schema", "error"),
    ("bad-model", _req("bad-model", model="nope"), "unknown_model", "error"),
    ("bad-version", _req("bad-version", version="99"), "unknown_version", "error"),
    (
        "bad-shape",
        _req("bad-shape", inputs=_tensor(shape=[8], data=[1.0] * 8)),
        "bad_shape",
        "error",
    ),
    ("bad-count", _req("bad-count", inputs=_tensor(data=[1.0] * 15)), "bad_shape", "error"),
    (
        "bad-dtype",
        _req("bad-dtype", inputs=_tensor(datatype="INT64", data=[1] * 16)),
        "bad_dtype",
        "error",
    ),
    ("bad-values", _req("bad-values", inputs=_tensor(data=["a"] * 16)), "bad_dtype", "error"),
    (None, b'{"id": "huge", "model": "demo", "pad": "' + b"x" * 9000 + b'"}', "oversize", None),
    (
        "expired",
        _req("expired", deadline_ms=int(time.time() * 1000) - 60_000),
        "expired",
        "expired",
    ),
]


@pytest.mark.parametrize("engine", ["batch", "faust"])
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_bad_inputs_are_dead_lettered_and_good_ones_served(
    mode: str, engine: str, bootstrap: str, model_dir, start_workers
) -> None:
    settings = make_settings(bootstrap, model_dir, max_payload_bytes=8192, engine=engine)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    with Client(settings) as client:
        start_workers(settings, mode).wait_ready(client)
        good, bad = [], []
        for i, (request_id, raw, _, status) in enumerate(CASES):
            good.append(client.submit(demo_request(f"good-before-{i}")))
            if request_id is not None:
                bad.append((client.submit_raw(request_id, raw), status))
            else:
                producer = client._producer
                producer.produce(settings.requests_topic, raw, f"unanswerable-{i}".encode())
            good.append(client.submit(demo_request(f"good-after-{i}")))
        client.flush()
        assert {f.result(timeout=60).status for f in good} == {"ok"}
        for future, status in bad:
            response = future.result(timeout=60)
            assert response.status == status
            assert response.error is not None and response.error.message

    dlq = _read_topic(settings, settings.dlq_topic, len(CASES))
    reasons = sorted(r.reason for r in dlq)
    assert reasons == sorted(c[2] for c in CASES)
    by_reason_id = {(r.reason, r.request_id) for r in dlq}
    for request_id, _raw, reason, _ in CASES:
        assert (reason, request_id) in by_reason_id
    for record in dlq:
        assert record.error and record.topic and record.offset >= 0 and record.attempts == 1
        assert record.stage in ("gateway", "infer", "respond")
    originals = {r.original_b64 for r in dlq}
    assert base64.b64encode(b"{not json").decode() in originals


def test_dlq_records_match_their_schema(bootstrap: str, model_dir) -> None:
    """DLQ records are plain JSON that any consumer can read, as schemas/ says."""
    import jsonschema

    settings = make_settings(bootstrap, model_dir)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    producer = Producer(producer_config(settings))
    producer.produce(
        settings.dlq_topic,
        codec.dlq_record(b"abc", "t", 0, 1, "gateway", codec.RequestError("malformed", "x")),
    )
    producer.flush(10)
    record = _read_topic(settings, settings.dlq_topic, 1)[0]
    schema = json.loads(Path("schemas/dlq.schema.json").read_text())
    jsonschema.validate(json.loads(codec.encode(record)), schema)


def _read_topic(settings, topic: str, n: int, timeout_s: float = 30) -> list[codec.DlqRecord]:  # type: ignore[no-untyped-def]
    consumer = Consumer(consumer_config(settings, f"{settings.topic_prefix}-reader"))
    md = consumer.list_topics(topic, timeout=10).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in md.partitions])
    records: list[codec.DlqRecord] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < n and time.monotonic() < deadline:
            m = consumer.poll(0.2)
            if m is not None and m.error() is None:
                records.append(codec.decode_dlq(m.value()))
        # Nothing more than expected arrives.
        extra = consumer.poll(1.0)
        assert extra is None or extra.error() is not None, "unexpected extra DLQ record"
    finally:
        consumer.close()
    assert len(records) == n, f"got {len(records)} DLQ records, expected {n}"
    return records
