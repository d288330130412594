"""Seeded malformed requests of every kind a worker must survive, each with the DLQ reasons
it may land with and the id it must be answered by (when its id can be read).

A `random.Random` seed makes every flood replay exactly.
"""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from typing import Any

from benchmarks.harness import demo_request
from pipeline.protocol import codec

# The payload limit the garbage is sized against: `GarbageMaker.oversize` exceeds it and
# everything else fits. Workers fed this garbage run with it as `max_payload_bytes`.
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
    key: bytes | None = None  # the record's key and headers, where they are the garbage
    headers: list[tuple[str, bytes]] | None = None


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
            (self.forbidden_reply_to, 4),
            (self.header_flood, 1),
            (self.huge_key, 0.3),
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
            deep = b"[" * depth + b"1" + b"]" * depth
            return Garbage("deep_nesting", head + b'"data":' + deep + tail, MALFORMED)
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

    def forbidden_reply_to(self) -> Garbage:
        """A reply_to the worker must not write to: Kafka's own topics, the pipeline's other
        topics, another team's, or names a stream of which would each create a topic."""
        body = self._valid(self._id())
        body["reply_to"] = self.rng.choice(
            ["__consumer_offsets", "__transaction_state", "sluice.dlq", "sluice.requests",
             "sluice.features-changelog", "other-team.replies", f"made-up-{self.n}"]
        )  # fmt: skip
        return self._answered("forbidden_reply_to", body, frozenset({codec.FORBIDDEN_REPLY_TO}))

    def header_flood(self) -> Garbage:
        """A valid request in a record with 1,000 headers (a correlation header among them,
        repeated)."""
        garbage = self._answered(
            "header_flood", self._valid(self._id()), frozenset({codec.TOO_MANY_HEADERS})
        )
        names = ["x-flood", "traceparent"]
        headers = [(names[i % 2], str(i).encode()) for i in range(1_000)]
        return dataclasses.replace(garbage, headers=headers)

    def huge_key(self) -> Garbage:
        """A valid request in a record with a 1 MB key."""
        garbage = self._answered(
            "huge_key", self._valid(self._id()), frozenset({codec.KEY_TOO_LARGE})
        )
        return dataclasses.replace(
            garbage, key=bytes(self.rng.getrandbits(8) for _ in range(16)) * 62_500
        )

    def expired(self) -> Garbage:
        body = self._valid(self._id())
        body["deadline_ms"] = self.rng.randint(1, 1_600_000_000_000)
        return self._answered("expired", body, frozenset({codec.EXPIRED}))
