"""MessagePack requests with raw little-endian tensor bytes: same schema, same errors."""

from __future__ import annotations

import base64

import msgspec
import numpy as np
import pytest

from pipeline.protocol import codec
from pipeline.protocol.codec import MSGPACK, RequestError


def _request(data: object, datatype: str = "FP32", shape: list[int] | None = None) -> dict:
    return {
        "id": "b1",
        "model": "demo",
        "inputs": [{"name": "x", "datatype": datatype, "shape": shape or [4], "data": data}],
    }


def test_content_type_header_picks_the_format() -> None:
    assert codec.content_type(None) == codec.JSON
    assert codec.content_type([("content-type", b"application/msgpack")]) == MSGPACK
    assert codec.content_type([("content-type", b"application/x-msgpack")]) == MSGPACK
    assert codec.content_type([("content-type", b"application/json")]) == codec.JSON


def test_msgpack_request_with_raw_bytes_decodes_to_the_same_array() -> None:
    values = np.array([1.5, -2.0, 3.25, 0.0], dtype="<f4")
    raw = msgspec.msgpack.encode(_request(values.tobytes()))
    request = codec.decode_request(raw, 1 << 20, MSGPACK)
    array = codec.tensor_to_array(request.inputs[0], 1 << 20)
    np.testing.assert_array_equal(array, values)
    assert array.dtype == np.float32


def test_json_request_may_carry_base64_bytes() -> None:
    values = np.arange(4, dtype="<i8")
    raw = codec.encode(_request(base64.b64encode(values.tobytes()).decode(), "INT64"))
    request = codec.decode_request(raw, 1 << 20)
    np.testing.assert_array_equal(codec.tensor_to_array(request.inputs[0], 1 << 20), values)


def test_msgpack_lists_work_as_in_json() -> None:
    raw = msgspec.msgpack.encode(_request([1.0, 2.0, 3.0, 4.0]))
    request = codec.decode_request(raw, 1 << 20, MSGPACK)
    assert codec.tensor_to_array(request.inputs[0], 1 << 20).tolist() == [1.0, 2.0, 3.0, 4.0]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (np.zeros(3, "<f4").tobytes(), "bad_shape"),  # 12 bytes for 4 FP32 values
        (np.array([1.0, np.nan, 0, 0], "<f4").tobytes(), "bad_dtype"),
        (np.array([np.inf, 0, 0, 0], "<f4").tobytes(), "bad_dtype"),
    ],
)
def test_bad_raw_bytes_are_request_errors(data: bytes, code: str) -> None:
    request = codec.decode_request(msgspec.msgpack.encode(_request(data)), 1 << 20, MSGPACK)
    with pytest.raises(RequestError) as err:
        codec.tensor_to_array(request.inputs[0], 1 << 20)
    assert err.value.code == code


def test_malformed_and_invalid_msgpack() -> None:
    with pytest.raises(RequestError) as err:
        codec.decode_request(b"\xc1\xc1\xc1", 1 << 20, MSGPACK)
    assert err.value.code == "malformed" and "MessagePack" in err.value.message
    missing = msgspec.msgpack.encode({"id": "m1", "model": "demo"})
    with pytest.raises(RequestError) as err:
        codec.decode_request(missing, 1 << 20, MSGPACK)
    assert err.value.code == "schema" and err.value.request_id == "m1"


def test_msgpack_response_round_trip_with_raw_outputs() -> None:
    out = np.array([0.25, -1.0], dtype=np.float32)
    response = codec.Response(
        id="r", status="ok", outputs=[codec.array_to_tensor("logits", out, raw=True)]
    )
    decoded = codec.decode_response(codec.encode(response, MSGPACK), MSGPACK)
    assert decoded.outputs is not None
    np.testing.assert_array_equal(codec.tensor_values(decoded.outputs[0]), out)
