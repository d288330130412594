"""A flood of garbage mixed with valid requests: the worker never dies, every valid request
is answered with the model's outputs, every bad record lands in the DLQ exactly once with
a reason and its original bytes, and bad records whose id can be read are answered.

The garbage comes from a seeded generator (`random.Random`), so a failure replays exactly.
"""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np
from confluent_kafka import Producer

from pipeline import codec
from pipeline.client import Client
from pipeline.kafka import ensure_topics, pipeline_topics, producer_config
from pipeline.models import ModelRegistry
from tests.integration.conftest import demo_request, make_settings
from tests.integration.topic_reader import TopicReader

SEED = 6_2024
N_GARBAGE = 10_000
N_VALID = 1_000
MAX_PAYLOAD_BYTES = 65_536

MALFORMED = frozenset({codec.MALFORMED})
SCHEMA = frozenset({codec.SCHEMA})


@dataclass(frozen=True)
class Garbage:
    """One bad record, what the DLQ must say about it, and the id it must be answered by."""

    kind: str
    value: bytes | None
    reasons: frozenset[str]
    answer_id: str | None = None


class GarbageMaker:
    """Seeded malformed requests, one kind chosen at random per record."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.n = 0
        self.kinds = [
            (self.truncated, 14),
            (self.wrong_type, 16),
            (self.null_value, 8),
            (self.missing_field, 10),
            (self.wrong_dtype, 10),
            (self.huge_array, 4),
            (self.oversize, 1),
            (self.invalid_utf8, 8),
            (self.deep_nesting, 5),
            (self.not_an_object, 8),
            (self.random_bytes, 10),
            (self.unknown_model, 3),
            (self.expired, 3),
        ]

    def make(self, n: int) -> list[Garbage]:
        makers, weights = zip(*self.kinds, strict=True)
        return [self.rng.choices(makers, weights)[0]() for _ in range(n)]

    # -- building blocks ----------------------------------------------------------------------

    def _id(self) -> str:
        self.n += 1
        return f"g-{self.n}"

    def _valid(self, request_id: str) -> dict[str, Any]:
        features = [round(self.rng.uniform(-3, 3), 4) for _ in range(16)]
        body = demo_request(request_id, features)
        if self.rng.random() < 0.3:
            body["parameters"] = {"top_k": self.rng.randint(1, 4)}
        return body

    @staticmethod
    def _dump(body: Any) -> bytes:
        return json.dumps(body, separators=(",", ":")).encode()

    def _answered(self, kind: str, body: dict[str, Any], reasons: frozenset[str]) -> Garbage:
        value = self._dump(body)
        assert len(value) <= MAX_PAYLOAD_BYTES
        return Garbage(kind, value, reasons, body["id"])

    # -- the kinds ----------------------------------------------------------------------------

    def truncated(self) -> Garbage:
        # A proper prefix of a JSON object never closes it: always invalid JSON.
        raw = self._dump(self._valid(self._id()))
        return Garbage("truncated", raw[: self.rng.randrange(0, len(raw) - 1)], MALFORMED)

    def wrong_type(self) -> Garbage:
        body = self._valid(self._id())
        tensor = body["inputs"][0]
        where, bad = self.rng.choice(
            [
                ("id", 17), ("id", ["g"]), ("id", {"a": 1}), ("id", True), ("id", ""),
                ("id", "x" * 300), ("model", 5), ("model", ["demo"]), ("model", "bad name!"),
                ("inputs", "features"), ("inputs", 3), ("inputs", {}), ("inputs", []),
                ("name", 1), ("datatype", 32), ("datatype", "FLOAT32"), ("shape", "16"),
                ("shape", [16.5]), ("shape", ["16"]), ("shape", [-1]), ("shape", [1] * 9),
                ("data", 5), ("data", {"x": 1}), ("data", True), ("parameters", "top"),
                ("top_k", 0), ("top_k", 101), ("top_k", "3"), ("deadline_ms", -5),
                ("deadline_ms", "soon"), ("ttl_ms", 0), ("priority", 10), ("version", 2),
                ("key", 7), ("reply_to", 9),
            ]
        )  # fmt: skip
        if where in tensor:
            tensor[where] = bad
        elif where == "top_k":
            body["parameters"] = {"top_k": bad}
        else:
            body[where] = bad
        if where == "id":
            return Garbage("wrong_type", self._dump(body), SCHEMA)
        return self._answered("wrong_type", body, SCHEMA)

    def null_value(self) -> Garbage:
        body = self._valid(self._id())
        # Only required fields (and priority, which has a default but is not nullable):
        # null is a valid value for the optional ones.
        where = self.rng.choice(["id", "model", "inputs", "name", "datatype", "shape", "data",
                                 "priority", "element"])  # fmt: skip
        tensor = body["inputs"][0]
        if where == "element":
            tensor["data"][self.rng.randrange(16)] = None
            return self._answered("null_value", body, frozenset({codec.BAD_DTYPE}))
        if where in tensor:
            tensor[where] = None
        else:
            body[where] = None
        if where == "id":
            return Garbage("null_value", self._dump(body), SCHEMA)
        return self._answered("null_value", body, SCHEMA)

    def missing_field(self) -> Garbage:
        body = self._valid(self._id())
        where = self.rng.choice(["id", "model", "inputs", "name", "datatype", "shape", "data"])
        tensor = body["inputs"][0]
        if where in tensor:
            del tensor[where]
        else:
            del body[where]
        if where == "id":
            return Garbage("missing_field", self._dump(body), SCHEMA)
        return self._answered("missing_field", body, SCHEMA)

    def wrong_dtype(self) -> Garbage:
        body = self._valid(self._id())
        tensor = body["inputs"][0]
        choice = self.rng.randrange(5)
        if choice == 0:
            tensor["datatype"] = self.rng.choice(["INT64", "INT8", "FP64", "FP16", "UINT8"])
            tensor["data"] = [self.rng.randint(0, 9) for _ in range(16)]
        elif choice == 1:
            tensor["datatype"] = "BYTES"
            tensor["data"] = ["a"] * 16
        elif choice == 2:
            tensor["data"] = ["x"] * 16
        elif choice == 3:
            tensor["data"] = [{"v": 1}] * 16
        else:
            # Ragged rows (nested rows of the right total size would be valid).
            tensor["data"] = [[1.0, 2.0]] * 7 + [[1.0, 2.0, 3.0]]
            return self._answered("wrong_dtype", body, frozenset({codec.BAD_SHAPE}))
        return self._answered("wrong_dtype", body, frozenset({codec.BAD_DTYPE}))

    def huge_array(self) -> Garbage:
        """A large array that still fits in the payload limit: the wrong shape for the model."""
        body = self._valid(self._id())
        tensor = body["inputs"][0]
        n = self.rng.randint(2_000, 20_000)
        tensor["data"] = [self.rng.randint(0, 9) for _ in range(n)]
        tensor["shape"] = [n] if self.rng.random() < 0.5 else [16]
        return self._answered("huge_array", body, frozenset({codec.BAD_SHAPE}))

    def oversize(self) -> Garbage:
        body = self._valid(self._id())
        n = self.rng.randint(40_000, 60_000)
        body["inputs"][0]["data"] = [self.rng.randint(0, 9) for _ in range(n)]
        body["inputs"][0]["shape"] = [n]
        value = self._dump(body)
        assert len(value) > MAX_PAYLOAD_BYTES
        # Too large to read at all, so not answerable.
        return Garbage("oversize", value, frozenset({codec.OVERSIZE}))

    def invalid_utf8(self) -> Garbage:
        raw = self._dump(self._valid(self._id()))
        bad = self.rng.choice([b"\xff", b"\xfe\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xe2\x82",
                               b"\xf0\x28\x8c\xbc", b"\x80"])  # fmt: skip
        # Inside a string value: the id, the model name or the tensor's name.
        anchor = self.rng.choice([b'"g-', b'"demo"', b'"features"'])
        at = raw.index(anchor) + 2
        return Garbage("invalid_utf8", raw[:at] + bad + raw[at:], MALFORMED)

    def deep_nesting(self) -> Garbage:
        body = self._valid(self._id())
        if self.rng.random() < 0.5:
            # Deeper than the decoder follows.
            depth = self.rng.randint(2_000, 8_000)
            raw = self._dump(body)
            head, tail = raw.split(b'"data":', 1)
            tail = tail[tail.index(b"]") + 1 :]
            nested = b"[" * depth + b"1" + b"]" * depth
            return Garbage("deep_nesting", head + b'"data":' + nested + tail, MALFORMED)
        # Decodable, but nothing like the model's [16]; numpy gives up at 64 dimensions.
        depth = self.rng.randint(2, 200)
        nested: Any = [1.0]
        for _ in range(depth):
            nested = [nested]
        body["inputs"][0]["data"] = nested
        return self._answered("deep_nesting", body, frozenset({codec.BAD_SHAPE}))

    def not_an_object(self) -> Garbage:
        value = self.rng.choice(
            [
                0, -1.5, 1e308, True, False, None, "demo", "", [], [1, 2, 3],
                [self._valid("g-in-array")],
            ]
        )  # fmt: skip
        return Garbage("not_an_object", self._dump(value), SCHEMA)

    def random_bytes(self) -> Garbage:
        n = self.rng.choice([0, 1, 2, 5, 17, 64, 300, 4000])
        if n == 0 and self.rng.random() < 0.5:
            return Garbage("random_bytes", None, MALFORMED)  # a null record value
        raw = bytes(self.rng.getrandbits(8) for _ in range(n))
        # A few bytes can happen to be JSON that is not an object ("7", " 1"): schema.
        return Garbage("random_bytes", raw, MALFORMED | SCHEMA)

    def unknown_model(self) -> Garbage:
        body = self._valid(self._id())
        if self.rng.random() < 0.5:
            body["model"] = f"nope-{self.n}"
            return self._answered("unknown_model", body, frozenset({codec.UNKNOWN_MODEL}))
        body["version"] = str(self.rng.randint(3, 99))
        return self._answered("unknown_model", body, frozenset({codec.UNKNOWN_VERSION}))

    def expired(self) -> Garbage:
        body = self._valid(self._id())
        body["deadline_ms"] = self.rng.randint(1, 1_600_000_000_000)
        return self._answered("expired", body, frozenset({codec.EXPIRED}))


def test_garbage_flood_is_dead_lettered_and_valid_requests_served(
    bootstrap: str, model_dir, registry: ModelRegistry, start_workers
) -> None:
    settings = make_settings(bootstrap, model_dir, max_payload_bytes=MAX_PAYLOAD_BYTES)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    garbage = GarbageMaker(SEED).make(N_GARBAGE)
    rng = random.Random(SEED + 1)
    features = [[round(rng.uniform(-3, 3), 4) for _ in range(16)] for _ in range(N_VALID)]
    model = registry.resolve("demo")
    expected = model.run([np.asarray(features, dtype=np.float32)])[0]
    order = ["g"] * N_GARBAGE + ["v"] * N_VALID
    rng.shuffle(order)

    # Where each garbage record landed, from its delivery report: (partition, offset) -> index.
    landed: dict[tuple[int, int], int] = {}
    failed: list[Any] = []

    def delivered(index: int):  # type: ignore[no-untyped-def]
        def report(err: Any, msg: Any) -> None:
            if err is not None:
                failed.append(err)
            else:
                landed[(msg.partition(), msg.offset())] = index

        return report

    producer = Producer(producer_config(settings))
    with Client(settings) as client:
        workers = start_workers(settings, "fused")
        workers.wait_ready(client)
        futures = []
        g = v = 0
        for what in order:
            if what == "v":
                futures.append(client.submit(demo_request(f"v-{v}", features[v])))
                v += 1
                continue
            key = None if g % 3 else f"k-{g}".encode()
            while True:
                try:
                    producer.produce(
                        settings.requests_topic, garbage[g].value, key, on_delivery=delivered(g)
                    )
                    break
                except BufferError:
                    producer.poll(0.05)
            producer.poll(0)
            g += 1
        assert producer.flush(60) == 0
        client.flush()
        assert not failed, failed[:5]
        assert len(landed) == N_GARBAGE

        responses = [f.result(timeout=180) for f in futures]
        for i, r in enumerate(responses):
            assert r.id == f"v-{i}" and r.status == "ok", r
            assert r.outputs is not None and r.outputs[0].name == "logits"
            np.testing.assert_allclose(
                codec.tensor_values(r.outputs[0]), expected[i], rtol=1e-4, atol=1e-5
            )

    # Every garbage record is in the DLQ once, with its reason and its exact bytes.
    dlq: dict[tuple[int, int], list[codec.DlqRecord]] = {}
    with TopicReader(settings, settings.dlq_topic) as reader:

        def on_dlq(read: Any) -> None:
            record = codec.decode_dlq(read.value)
            dlq.setdefault((record.partition, record.offset), []).append(record)

        reader.read_until(lambda: len(reader.records) >= N_GARBAGE, 180, on_dlq)
        assert len(reader.records) == N_GARBAGE, f"{len(reader.records)} DLQ records"
    assert set(dlq) == set(landed)
    originals = Counter(base64.b64decode(r.original_b64) for rs in dlq.values() for r in rs)
    assert originals == Counter(item.value or b"" for item in garbage)
    reasons: Counter[str] = Counter()
    for where, records in dlq.items():
        item = garbage[landed[where]]
        assert len(records) == 1, (item, records)
        [record] = records
        reasons[record.reason] += 1
        assert record.reason in codec.REASONS, record
        assert record.reason in item.reasons, (item.kind, record.reason, record.error, item.value)
        assert record.topic == settings.requests_topic and record.stage == "gateway"
        assert record.error and record.attempts >= 1
        assert base64.b64decode(record.original_b64) == (item.value or b""), item.kind
        assert record.request_id == item.answer_id, (item.kind, record, item.value)

    # Garbage whose id could be read was answered, with the same reason.
    answerable = {item.answer_id: item for item in garbage if item.answer_id is not None}
    by_reason_id = {(r.request_id, r.reason) for rs in dlq.values() for r in rs}
    answers: dict[str, list[codec.Response]] = {}
    with TopicReader(settings, settings.responses_topic) as reader:

        def on_response(read: Any) -> None:
            response = codec.decode_response(read.value)
            if response.id in answerable:
                answers.setdefault(response.id, []).append(response)

        reader.read_until(lambda: len(answers) >= len(answerable), 120, on_response)
    assert set(answers) == set(answerable)
    for request_id, got in answers.items():
        assert len(got) == 1, got
        [response] = got
        assert response.status in ("error", "expired") and response.error is not None
        assert (request_id, response.error.code) in by_reason_id
        assert (response.status == "expired") == (response.error.code == codec.EXPIRED)

    assert workers.alive(), f"worker exited:\n{workers.logs()}"
    logs = "".join(p.read_text() for p in workers.log_dir.glob("*.log"))
    # Every record was handled by a known reason, never by the catch-all for surprises.
    assert "unexpected error admitting" not in logs, logs[-4000:]
    kinds = Counter(item.kind for item in garbage)
    print(f"garbage kinds {dict(kinds)}; DLQ reasons {dict(reasons)}; answered {len(answers)}")
