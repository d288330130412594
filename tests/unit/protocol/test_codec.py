"""Wire formats: request decoding and its reason codes, tensors, DLQ records, JSON Schemas."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

import jsonschema
import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from referencing import Registry, Resource

from pipeline.protocol import codec
from pipeline.protocol.codec import (
    BAD_DTYPE,
    BAD_SHAPE,
    DLQ_ERROR_CHARS,
    DLQ_PREFIX_BYTES,
    MALFORMED,
    OVERSIZE,
    REASONS,
    SCHEMA,
    DlqRecord,
    ErrorInfo,
    Request,
    RequestError,
    Response,
    Tensor,
    Timings,
    array_to_tensor,
    decode_dlq,
    decode_request,
    decode_response,
    dlq_record,
    encode,
    shrink_dlq,
    tensor_to_array,
)

SCHEMAS = Path(__file__).resolve().parents[3] / "schemas"
LIMIT = 1_048_576


def request_doc(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": "req-1",
        "model": "demo",
        "inputs": [
            {"name": "features", "datatype": "FP32", "shape": [4], "data": [0.5, -1.0, 2.0, 3.25]}
        ],
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def raw(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def reject(data: bytes | None, limit: int = LIMIT) -> RequestError:
    """The RequestError that decoding ``data`` raises; any other outcome fails the test."""
    try:
        decode_request(data, limit)
    except RequestError as exc:
        return exc
    except Exception as exc:  # noqa: BLE001 - reported as a plain failure, see below
        # Not re-raised: a RecursionError out of msgspec, formatted by pytest, has been seen to
        # break the interpreter's AST recursion accounting for the rest of the session.
        pytest.fail(f"decode_request raised {type(exc).__name__}: {exc}, not RequestError")
    pytest.fail("decode_request accepted an invalid request")


# -- decode_request -------------------------------------------------------------------------


def test_decode_valid_request() -> None:
    doc = request_doc(
        version="2",
        key="user-7",
        parameters={"top_k": 3},
        deadline_ms=123,
        ttl_ms=500,
        reply_to="my.replies",
        priority=5,
    )
    req = decode_request(raw(doc), LIMIT)
    assert isinstance(req, Request)
    assert (req.id, req.model, req.version, req.key) == ("req-1", "demo", "2", "user-7")
    assert req.parameters is not None and req.parameters.top_k == 3
    assert (req.deadline_ms, req.ttl_ms, req.reply_to, req.priority) == (123, 500, "my.replies", 5)
    [t] = req.inputs
    assert (t.name, t.datatype, t.shape, t.data) == (
        "features",
        "FP32",
        [4],
        [0.5, -1.0, 2.0, 3.25],
    )


def test_decode_minimal_request_defaults() -> None:
    req = decode_request(raw(request_doc()), LIMIT)
    assert req.version is None and req.reply_to is None and req.parameters is None
    assert req.deadline_ms is None and req.ttl_ms is None
    assert req.priority == 0


def test_oversize_is_checked_on_bytes_before_parsing() -> None:
    data = raw(request_doc())
    assert decode_request(data, len(data)).id == "req-1"  # exactly at the limit is fine
    err = reject(data, len(data) - 1)
    assert err.code == OVERSIZE
    assert str(len(data)) in err.message and str(len(data) - 1) in err.message
    # Not even parsed: garbage over the limit is oversize, not malformed.
    assert reject(b"\xff" * 100, 99).code == OVERSIZE


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"not json",
        b'{"id": "a", "model": "demo", "inputs": [}',
        b"\xff\xfe{}",  # invalid UTF-8 outside any string
        raw(request_doc())[:-1],  # truncated
    ],
)
def test_malformed_json(data: bytes) -> None:
    err = reject(data)
    assert err.code == MALFORMED
    assert err.request_id is None


def test_null_value_is_malformed() -> None:
    err = reject(None)
    assert err.code == MALFORMED
    assert "null" in err.message


@pytest.mark.parametrize(
    "data",
    [
        # Invalid UTF-8 inside a string value. msgspec raises UnicodeDecodeError (not a
        # DecodeError) here, so it must still come out as a RequestError.
        b'{"id": "\xff", "model": "demo", "inputs": []}',
        b'{"id": "a", "model": "demo", "inputs": [{"name": "f\xc3", "datatype": "FP32", '
        b'"shape": [1], "data": [1]}]}',
        # ... and in a field that is only read when salvaging an invalid request.
        b'{"id": "a", "model": "not valid!", "version": "\xff\xfe", "inputs": []}',
    ],
)
def test_invalid_utf8_in_a_string_is_malformed(data: bytes) -> None:
    err = reject(data)
    assert err.code in (MALFORMED, SCHEMA)


@pytest.mark.parametrize(
    "data",
    [
        # 20 KB of nesting, well under the payload limit: must be an error, not a crash.
        raw(request_doc())[:-3]
        + b', "parameters": {"x": '
        + b"[" * 10_000
        + b"]" * 10_000
        + b"}}]}",
        b'{"id": "a", "model": "demo", "inputs": [{"name": "f", "datatype": "FP32", '
        b'"shape": [1], "data": ' + b"[" * 10_000 + b"]" * 10_000 + b"}]}",
        b'{"id": "a", "model": "not valid!", "extra": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    ],
    ids=["tensor-parameters", "tensor-data", "unknown-field-while-salvaging"],
)
def test_deeply_nested_json_is_a_request_error(data: bytes) -> None:
    assert len(data) < LIMIT
    err = reject(data)
    assert err.code in (MALFORMED, SCHEMA)


@pytest.mark.parametrize(
    ("doc", "where"),
    [
        (request_doc(id=None), "id"),
        (request_doc(id=5), "$.id"),
        (request_doc(id=""), "$.id"),
        (request_doc(model=None), "model"),
        (request_doc(model="no spaces allowed"), "$.model"),
        (request_doc(model="x" * 129), "$.model"),
        (request_doc(inputs=[]), "$.inputs"),
        (request_doc(inputs="features"), "$.inputs"),
        (
            request_doc(inputs=[{"name": "f", "datatype": "FP32", "shape": [-1], "data": []}]),
            "$.inputs[0].shape[0]",
        ),
        (request_doc(inputs=[{"name": "f", "datatype": "FP32", "shape": [1]}]), "data"),
        (request_doc(parameters={"top_k": 0}), "$.parameters.top_k"),
        (request_doc(priority=10), "$.priority"),
        (request_doc(ttl_ms=0), "$.ttl_ms"),
        (request_doc(reply_to="bad topic"), "$.reply_to"),
        ([request_doc()], "object"),
        ("a string", "object"),
    ],
)
def test_schema_errors(doc: Any, where: str) -> None:
    err = reject(raw(doc))
    assert err.code == SCHEMA
    assert where in err.message


def test_schema_error_salvages_what_is_known() -> None:
    doc = request_doc(inputs=[], version="3", reply_to="client.replies")
    err = reject(raw(doc))
    assert err.code == SCHEMA
    assert (err.request_id, err.model, err.version, err.reply_to) == (
        "req-1",
        "demo",
        "3",
        "client.replies",
    )


def test_schema_error_salvages_only_valid_parts() -> None:
    # The model name is the invalid part: the id and reply_to can still be answered.
    err = reject(raw(request_doc(model="bad model", reply_to="client.replies")))
    assert err.code == SCHEMA
    assert err.request_id == "req-1"
    assert err.model == "bad model"  # kept for the DLQ record; the schema caps its length
    assert err.reply_to == "client.replies"


def test_schema_error_does_not_salvage_unusable_values() -> None:
    err = reject(raw(request_doc(id=5, model=["x"], reply_to="bad topic!")))
    assert err.code == SCHEMA
    assert err.request_id is None and err.model is None and err.reply_to is None
    err = reject(raw(request_doc(id="x" * 257)))
    assert err.request_id is None


# -- tensors --------------------------------------------------------------------------------


def t(datatype: str, shape: list[int], data: list[Any], name: str = "x") -> Tensor:
    return Tensor(name=name, datatype=datatype, shape=shape, data=data)


def test_tensor_to_array_flat() -> None:
    a = tensor_to_array(t("FP32", [2, 3], [1, 2, 3, 4, 5, 6.5]), 100)
    assert a.dtype == np.float32
    assert a.shape == (2, 3)
    np.testing.assert_array_equal(a, np.array([[1, 2, 3], [4, 5, 6.5]], dtype=np.float32))


def test_tensor_to_array_nested() -> None:
    a = tensor_to_array(t("INT64", [2, 2], [[1, -2], [3, 4]]), 100)
    assert a.dtype == np.int64
    np.testing.assert_array_equal(a, [[1, -2], [3, 4]])


@pytest.mark.parametrize(
    ("datatype", "data", "dtype"),
    [
        ("BOOL", [True, False], np.bool_),
        ("UINT8", [0, 255], np.uint8),
        ("UINT16", [0, 65535], np.uint16),
        ("INT8", [-128, 127], np.int8),
        ("INT16", [-32768, 32767], np.int16),
        ("INT32", [-(2**31), 2**31 - 1], np.int32),
        ("INT64", [-(2**63), 2**63 - 1], np.int64),
        ("UINT64", [2**63, 2**64 - 1], np.uint64),
        ("FP16", [0.5, -2.0], np.float16),
        ("FP64", [0.1, 1e300], np.float64),
    ],
)
def test_tensor_to_array_dtypes_at_their_limits(datatype: str, data: list[Any], dtype: Any) -> None:
    a = tensor_to_array(t(datatype, [2], data), 100)
    assert a.dtype == np.dtype(dtype)
    assert a.tolist() == data


def test_uint64_above_int64_beside_small_values() -> None:
    # numpy turns [0, 2**64 - 1] into float64 (no common integer type), so a valid UINT64
    # tensor must not be judged by the dtype numpy infers for the mixed list.
    a = tensor_to_array(t("UINT64", [2], [0, 2**64 - 1]), 100)
    assert a.dtype == np.uint64
    assert a.tolist() == [0, 2**64 - 1]


def test_tensor_to_array_scalar_and_empty() -> None:
    assert tensor_to_array(t("FP32", [], [3]), 10).shape == ()
    assert tensor_to_array(t("FP32", [0, 4], []), 10).shape == (0, 4)


@pytest.mark.parametrize(
    ("shape", "data"),
    [
        ([3], [1, 2]),
        ([2, 2], [1, 2, 3, 4, 5]),
        ([2, 2], [[1, 2], [3]]),  # ragged
        ([3], [1, [2, 3]]),  # ragged
        ([1], []),
    ],
)
def test_bad_shape(shape: list[int], data: list[Any]) -> None:
    with pytest.raises(RequestError) as info:
        tensor_to_array(t("FP32", shape, data), 100)
    assert info.value.code == BAD_SHAPE
    assert "'x'" in info.value.message


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("FP32", ["a", "b"]),
        ("FP32", [1, "b"]),
        ("FP32", [1, None]),
        ("FP32", [{"a": 1}, 2]),
        ("INT64", [1.5, 2]),
        ("INT32", [1, 2.25]),
        ("BYTES", ["a", "b"]),  # a valid datatype that models cannot take
        ("COMPLEX64", [1, 2]),
        ("fp32", [1, 2]),
        ("FP16", [1e10, 0]),  # out of range for half precision
        ("INT64", [2**70, 0]),
    ],
)
def test_bad_dtype(datatype: str, data: list[Any]) -> None:
    with pytest.raises(RequestError) as info:
        tensor_to_array(t(datatype, [2], data), 100)
    assert info.value.code == BAD_DTYPE
    assert "'x'" in info.value.message


@pytest.mark.parametrize(
    ("datatype", "data"),
    [
        ("UINT8", [256, 0]),
        ("UINT8", [-1, 0]),
        ("INT8", [128, 0]),
        ("INT16", [40000, 0]),
        ("UINT32", [2**32, 0]),
        ("INT64", [2**63, 0]),
    ],
)
def test_out_of_range_integers_are_bad_dtype_not_wrapped(datatype: str, data: list[int]) -> None:
    # Integer casts in numpy wrap silently (errstate does not cover them): 256 as UINT8 would
    # reach the model as 0. The request must be refused instead.
    with pytest.raises(RequestError) as info:
        tensor_to_array(t(datatype, [2], data), 100)
    assert info.value.code == BAD_DTYPE


def test_oversize_elements() -> None:
    assert tensor_to_array(t("FP32", [10, 10], [0.0] * 100), 100).size == 100
    with pytest.raises(RequestError) as info:
        tensor_to_array(t("FP32", [10, 11], [0.0] * 110), 100)
    assert info.value.code == OVERSIZE
    assert "110" in info.value.message and "100" in info.value.message


@pytest.mark.parametrize("shape", [[2**32, 2**32], [2**21, 2**21, 2**22], [2**62, 4]])
def test_oversize_elements_when_the_count_overflows_int64(shape: list[int]) -> None:
    # The element count must be computed without int64 wrap-around: 2**64 is not 0.
    with pytest.raises(RequestError) as info:
        tensor_to_array(t("FP32", shape, []), 1_000_000)
    assert info.value.code == OVERSIZE


@pytest.mark.parametrize(
    "array",
    [
        np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
        np.array([[1, -2], [3, 4]], dtype=np.int64),
        np.array([0, 255], dtype=np.uint8),
        np.array([True, False, True]),
        np.array([1.5, -0.25], dtype=np.float16),
        np.array([1e-300, 1e300], dtype=np.float64),
        np.zeros((2, 0), dtype=np.int32),
    ],
)
def test_array_to_tensor_round_trip(array: np.ndarray) -> None:
    tensor = array_to_tensor("out", array)
    assert tensor.name == "out"
    assert tensor.shape == list(array.shape)
    # Through the wire and back.
    back = msgspec_round_trip(tensor)
    result = tensor_to_array(back, 1_000_000)
    assert result.dtype == array.dtype
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)


def msgspec_round_trip(tensor: Tensor) -> Tensor:
    import msgspec

    return msgspec.json.decode(encode(tensor), type=Tensor)


def test_array_to_tensor_datatypes() -> None:
    assert array_to_tensor("a", np.zeros(1, np.float32)).datatype == "FP32"
    assert array_to_tensor("a", np.zeros(1, np.int8)).datatype == "INT8"
    assert array_to_tensor("a", np.zeros(1, bool)).datatype == "BOOL"
    s = array_to_tensor("a", np.array([b"x", "y"], dtype=object))
    assert (s.datatype, s.data) == ("BYTES", ["x", "y"])


def test_array_to_tensor_data_is_flat() -> None:
    tensor = array_to_tensor("a", np.arange(6, dtype=np.int32).reshape(2, 3))
    assert tensor.data == [0, 1, 2, 3, 4, 5]
    assert tensor.shape == [2, 3]


# -- DLQ records ----------------------------------------------------------------------------


def test_dlq_record_contents() -> None:
    original = b'{"id": "r9", "model": "demo", "inputs": [] \xff}'
    error = RequestError(SCHEMA, "inputs: too short", request_id="r9", model="demo")
    before = int(time.time() * 1000)
    record = decode_dlq(
        dlq_record(original, "sluice.requests", 3, 1234, "gateway", error, attempts=2)
    )
    after = int(time.time() * 1000)
    assert base64.b64decode(record.original_b64) == original
    assert (record.topic, record.partition, record.offset) == ("sluice.requests", 3, 1234)
    assert record.stage == "gateway"
    assert record.reason == SCHEMA
    assert record.error == "inputs: too short"
    assert record.attempts == 2
    assert before <= record.time_ms <= after
    assert (record.request_id, record.model) == ("r9", "demo")


def test_dlq_record_of_a_null_value() -> None:
    record = decode_dlq(dlq_record(None, "t", 0, 0, "gateway", RequestError(MALFORMED, "null")))
    assert record.original_b64 == ""
    assert record.attempts == 1
    assert record.request_id is None and record.model is None


def test_dlq_record_keeps_an_original_whole_while_it_fits() -> None:
    original = b"x" * 30_000
    error = RequestError(OVERSIZE, "too big")
    value = dlq_record(original, "t", 0, 7, "gateway", error, max_bytes=50_000)
    record = decode_dlq(value)
    assert len(value) <= 50_000 and not record.truncated
    assert base64.b64decode(record.original_b64) == original
    assert record.original_size == 30_000
    assert record.original_sha256 == hashlib.sha256(original).hexdigest()


@pytest.mark.parametrize("max_bytes", [8_000, 40_000, 1_048_576])
def test_dlq_record_of_an_original_too_large_keeps_a_prefix_its_size_and_sha256(
    max_bytes: int,
) -> None:
    original = bytes(range(256)) * (1 << 18)  # 64 MiB
    error = RequestError(OVERSIZE, "payload is 67108864 bytes" + "!" * 10_000)
    value = dlq_record(original, "sluice.requests", 1, 9, "gateway", error, max_bytes=max_bytes)
    record = decode_dlq(value)
    prefix = base64.b64decode(record.original_b64)
    assert len(value) <= max_bytes
    assert record.truncated and 0 < len(prefix) <= DLQ_PREFIX_BYTES
    assert original.startswith(prefix)
    assert record.original_size == len(original)
    assert record.original_sha256 == hashlib.sha256(original).hexdigest()
    assert (record.reason, record.offset) == (OVERSIZE, 9)
    assert record.error.startswith("payload is") and len(record.error) <= DLQ_ERROR_CHARS


def test_shrink_dlq_drops_the_original_and_keeps_what_identifies_it() -> None:
    original = b"y" * 5_000
    value = dlq_record(original, "t", 0, 1, "infer", RequestError(OVERSIZE, "x", "r1"))
    shrunk = decode_dlq(shrink_dlq(value))
    assert shrunk.truncated and shrunk.original_b64 == ""
    assert shrunk.original_size == 5_000
    assert shrunk.original_sha256 == hashlib.sha256(original).hexdigest()
    assert (shrunk.request_id, shrunk.stage) == ("r1", "infer")


# -- JSON Schemas ---------------------------------------------------------------------------


def _schemas() -> tuple[Registry, dict[str, dict[str, Any]]]:
    schemas = {p.name: json.loads(p.read_text()) for p in SCHEMAS.glob("*.schema.json")}
    registry: Registry = Registry()
    for name, schema in schemas.items():
        resource = Resource.from_contents(schema)
        registry = registry.with_resource(schema["$id"], resource)
        registry = registry.with_resource(name, resource)
    return registry, schemas


def validator(name: str) -> jsonschema.protocols.Validator:
    registry, schemas = _schemas()
    schema = schemas[name]
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema, registry=registry)


def test_schemas_are_valid_and_refs_resolve() -> None:
    registry, schemas = _schemas()
    assert set(schemas) == {
        "request.schema.json",
        "response.schema.json",
        "dlq.schema.json",
        "tensor.schema.json",
        "shadow.schema.json",
    }
    v = validator("request.schema.json")
    # The $ref really is followed: a tensor without data fails through it.
    bad = request_doc(inputs=[{"name": "f", "datatype": "FP32", "shape": [1]}])
    assert not v.is_valid(bad)
    assert v.is_valid(request_doc())


def test_dlq_reasons_match_the_schema() -> None:
    assert set(_schemas()[1]["dlq.schema.json"]["properties"]["reason"]["enum"]) == set(REASONS)


def test_datatypes_match_the_schema() -> None:
    enum = _schemas()[1]["tensor.schema.json"]["properties"]["datatype"]["enum"]
    assert set(enum) == set(codec.DTYPES)


def test_encoded_requests_validate() -> None:
    v = validator("request.schema.json")
    full = decode_request(
        raw(
            request_doc(
                version="1",
                key="k",
                parameters={"top_k": 2},
                deadline_ms=1,
                ttl_ms=1,
                reply_to="r",
                priority=9,
            )
        ),
        LIMIT,
    )
    for req in (full, decode_request(raw(request_doc()), LIMIT)):
        v.validate(json.loads(encode(req)))


def test_encoded_responses_validate() -> None:
    v = validator("response.schema.json")
    tensors = [
        array_to_tensor("logits", np.array([0.1, -0.2], dtype=np.float32)),
        array_to_tensor("labels", np.array(["a"], dtype=object)),
    ]
    examples = [
        Response(
            id="r",
            status="ok",
            model="demo",
            model_version="1",
            outputs=tensors,
            timings=Timings(queue_ms=0.1, inference_ms=1.0, total_ms=2.5, batch_size=4),
        ),
        Response(id="r", status="error", model=None, error=ErrorInfo("schema", "bad")),
        Response(
            id="r",
            status="expired",
            model="demo",
            model_version="2",
            error=ErrorInfo("expired", "late"),
        ),
    ]
    for response in examples:
        doc = json.loads(encode(response))
        v.validate(doc)
        assert decode_response(encode(response)) == response
    # And the schema has teeth: an ok response without outputs is invalid.
    assert not v.is_valid({"id": "r", "status": "ok"})
    assert not v.is_valid({"id": "r", "status": "error"})


@pytest.mark.parametrize("reason", REASONS)
def test_dlq_records_validate(reason: str) -> None:
    v = validator("dlq.schema.json")
    for error in (RequestError(reason, "why"), RequestError(reason, "why", "id", "demo")):
        for stage in ("gateway", "infer", "respond"):
            v.validate(json.loads(dlq_record(b"\x00raw", "t", 1, 2, stage, error)))


@pytest.mark.parametrize(
    "doc",
    [
        request_doc(id=""),
        request_doc(model="a b"),
        request_doc(inputs=[]),
        request_doc(priority=-1),
        request_doc(parameters={"top_k": 101}),
        request_doc(inputs=[{"name": "", "datatype": "FP32", "shape": [1], "data": [1]}]),
        request_doc(inputs=[{"name": "f", "datatype": "FP32", "shape": [1] * 9, "data": [1]}]),
        request_doc(inputs=[{"name": "f", "datatype": "FLOAT", "shape": [1], "data": [1]}]),
    ],
    ids=[
        "empty-id",
        "model-pattern",
        "no-inputs",
        "priority",
        "top_k",
        "tensor-name",
        "rank-9",
        "datatype-enum",
    ],
)
def test_decoder_rejects_what_the_request_schema_rejects(doc: dict[str, Any]) -> None:
    """The msgspec structs mirror request.schema.json: what one refuses, so does the other."""
    assert not validator("request.schema.json").is_valid(doc)
    assert reject(raw(doc)).code == SCHEMA


def test_dlq_struct_fields_match_the_schema() -> None:
    schema = _schemas()[1]["dlq.schema.json"]
    assert set(DlqRecord.__struct_fields__) == set(schema["properties"])
    assert set(schema["required"]) <= set(DlqRecord.__struct_fields__)


# -- fuzzing --------------------------------------------------------------------------------

_FRAGMENTS = [
    b"{",
    b"}",
    b"[",
    b"]",
    b":",
    b",",
    b'"',
    b" ",
    b"1",
    b"-0.5",
    b"1e999",
    b"null",
    b"true",
    b'"id"',
    b'"model"',
    b'"inputs"',
    b'"reply_to"',
    b'"version"',
    b'"x"',
    b'"demo"',
    b'"name"',
    b'"datatype"',
    b'"FP32"',
    b'"shape"',
    b'"data"',
    b"\xff",
    b"\xc3",
    b"\x00",
    b"\\u0000",
    b"\\ud800",
    b"\\",
    b"[" * 50,
    b'"\xff"',
    b'"a\xc3"',
    b'"\xe2\x82"',
]


@settings(max_examples=400, deadline=None, database=None, derandomize=True)
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_request_error(data: bytes) -> None:
    try:
        decode_request(data, 256)
    except RequestError as exc:
        assert exc.code in (MALFORMED, SCHEMA, OVERSIZE)


@settings(max_examples=600, deadline=None, database=None, derandomize=True)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=60).map(b"".join))
def test_json_like_bytes_only_raise_request_error(data: bytes) -> None:
    try:
        decode_request(b'{"id": "a", "model": ' + data, LIMIT)
    except RequestError as exc:
        assert exc.code in (MALFORMED, SCHEMA, OVERSIZE)


def test_shadow_records_and_variants_match_their_schemas() -> None:
    shadow = codec.ShadowRecord(
        id="r1", model="demo", model_version="2", variant="s", role="shadow", status="ok",
        outputs=[codec.array_to_tensor("logits", np.zeros(4, np.float32))], total_ms=3.5,
    )  # fmt: skip
    doc = json.loads(codec.encode(shadow))
    validator("shadow.schema.json").validate(doc)
    assert codec.decode_shadow(codec.encode(shadow)) == shadow
    assert not validator("shadow.schema.json").is_valid({**doc, "role": "answer"})
    response = codec.Response(id="r1", status="expired", variant="canary")
    validator("response.schema.json").validate(json.loads(codec.encode(response)))
    assert not validator("response.schema.json").is_valid(
        {"id": "r1", "status": "ok", "outputs": [], "variant": 3}
    )


class _PatternOracle(msgspec.Struct):
    """The request's names as the decoder itself checked them, pattern and all (before
    `decode_request` took the pattern over)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=codec.NAME_PATTERN)]
    reply_to: (
        Annotated[str, msgspec.Meta(min_length=1, max_length=249, pattern=codec.NAME_PATTERN)]
        | None
    ) = None


_NAMES = st.one_of(
    st.from_regex(r"[A-Za-z0-9_.-]{1,20}", fullmatch=True),
    st.text(alphabet=st.sampled_from("aZ9_.- \n/é\x00:"), min_size=0, max_size=12),
    st.text(max_size=6),
)


@settings(max_examples=300, deadline=None)
@given(model=_NAMES, reply_to=st.none() | _NAMES, msgpack=st.booleans())
def test_names_are_checked_as_the_decoder_checked_them(
    model: str, reply_to: str | None, msgpack: bool
) -> None:
    doc = request_doc(model=model, reply_to=reply_to)
    fmt = codec.MSGPACK if msgpack else codec.JSON
    raw = msgspec.msgpack.encode(doc) if msgpack else msgspec.json.encode(doc)

    def oracle(**names: str | None) -> str | None:
        try:
            msgspec.json.decode(msgspec.json.encode(names), type=_PatternOracle)
        except msgspec.ValidationError as exc:
            return str(exc)
        return None

    # Each name's own verdict; with both wrong, either one may be named.
    expected = {oracle(model=model), oracle(model="m", reply_to=reply_to)} - {None}
    for _ in range(2):  # the second time, from the names seen valid
        try:
            request = codec.decode_request(raw, 1 << 20, fmt)
        except RequestError as exc:
            assert exc.code == codec.SCHEMA and exc.message in expected
        else:
            assert not expected and (request.model, request.reply_to) == (model, reply_to)


def test_names_seen_valid_are_bounded() -> None:
    for i in range(codec._VALID_NAMES_MAX + 10):
        codec.decode_request(json.dumps(request_doc(model=f"m{i}")).encode(), 1 << 20)
    assert len(codec._VALID_NAMES) == codec._VALID_NAMES_MAX
