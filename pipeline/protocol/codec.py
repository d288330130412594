"""Wire formats: request, response, DLQ and inter-stage records (JSON, per schemas/).

Decoding is strict (msgspec structs that mirror the JSON Schemas) and every failure is a
`RequestError` with a reason code, so that callers can route it to the DLQ.
"""

from __future__ import annotations

import base64
import hashlib
import math
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

import msgspec
import numpy as np

from pipeline.errors import SluiceError


class Reason(StrEnum):
    """Why a request ended without outputs: the ``reason`` of its DLQ record and the
    ``error.code`` of its answer."""

    MALFORMED = "malformed"
    SCHEMA = "schema"
    OVERSIZE = "oversize"
    UNKNOWN_MODEL = "unknown_model"
    UNKNOWN_VERSION = "unknown_version"
    BAD_SHAPE = "bad_shape"
    BAD_DTYPE = "bad_dtype"
    EXPIRED = "expired"
    MODEL_ERROR = "model_error"
    # A record the worker made for the request is refused by its topic: the topic does not
    # exist, is invalid or is not writable.
    DELIVERY_FAILED = "delivery_failed"
    # A model takes features by key and the feature store has none for the request's key.
    UNKNOWN_KEY = "unknown_key"
    # The feature store's cold source failed (unreachable, timed out): it can be replayed.
    FEATURE_UNAVAILABLE = "feature_unavailable"
    # A record the worker made for the request (its answer, say) is larger than the
    # producer or its topic accepts.
    RECORD_TOO_LARGE = "record_too_large"


# The members by their short names, as the code writes them (`codec.MALFORMED`).
MALFORMED = Reason.MALFORMED
SCHEMA = Reason.SCHEMA
OVERSIZE = Reason.OVERSIZE
UNKNOWN_MODEL = Reason.UNKNOWN_MODEL
UNKNOWN_VERSION = Reason.UNKNOWN_VERSION
BAD_SHAPE = Reason.BAD_SHAPE
BAD_DTYPE = Reason.BAD_DTYPE
EXPIRED = Reason.EXPIRED
MODEL_ERROR = Reason.MODEL_ERROR
DELIVERY_FAILED = Reason.DELIVERY_FAILED
UNKNOWN_KEY = Reason.UNKNOWN_KEY
FEATURE_UNAVAILABLE = Reason.FEATURE_UNAVAILABLE
RECORD_TOO_LARGE = Reason.RECORD_TOO_LARGE
REASONS = tuple(r.value for r in Reason)

DTYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BYTES": np.object_,
}
DATATYPE_OF: dict[str, Any] = {np.dtype(v).name: k for k, v in DTYPES.items() if k != "BYTES"}

# Headers copied from a request onto its response (the response uses the request's format).
CORRELATION_HEADERS = ("correlation-id", "traceparent", "tracestate", "content-type")

# The `content-type` header picks the wire format; JSON when absent. MessagePack carries the
# same fields (the same schema), and a tensor's `data` may then be raw little-endian bytes.
CONTENT_TYPE_HEADER = "content-type"


class Format(StrEnum):
    """A record's wire format, as its ``content-type`` header names it."""

    JSON = "application/json"
    MSGPACK = "application/msgpack"


JSON = Format.JSON
MSGPACK = Format.MSGPACK
_MSGPACK_NAMES = {b"application/msgpack", b"application/x-msgpack"}


def content_type(headers: list[tuple[str, bytes]] | None) -> str:
    """The wire format named by a record's ``content-type`` header (JSON by default)."""
    for k, v in headers or ():
        if k == CONTENT_TYPE_HEADER:
            return MSGPACK if v in _MSGPACK_NAMES else JSON
    return JSON


_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.-]+$")]
_Topic = Annotated[str, msgspec.Meta(min_length=1, max_length=249, pattern=r"^[A-Za-z0-9_.-]+$")]


class RequestError(SluiceError):
    """A request that cannot be served, with its reason code and what is known of it."""

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | None = None,
        model: str | None = None,
        version: str | None = None,
        reply_to: str | None = None,
        attempts: int = 1,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.model = model
        self.version = version
        self.reply_to = reply_to
        self.attempts = attempts


Datatype = Literal[
    "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64",
    "FP16", "FP32", "FP64", "BYTES",
]  # fmt: skip


class Tensor(msgspec.Struct, omit_defaults=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    datatype: Datatype
    shape: Annotated[list[Annotated[int, msgspec.Meta(ge=0)]], msgspec.Meta(max_length=8)]
    # A list of numbers (flat or nested, row-major), or raw little-endian bytes: MessagePack
    # `bin`, or a base64 string in JSON.
    data: list[Any] | bytes
    parameters: dict[str, Any] | None = None


class Parameters(msgspec.Struct, omit_defaults=True):
    top_k: Annotated[int, msgspec.Meta(ge=1, le=100)] | None = None


class Request(msgspec.Struct, omit_defaults=True):
    id: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    model: _Name
    inputs: Annotated[list[Tensor], msgspec.Meta(min_length=1, max_length=16)]
    version: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None
    key: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    parameters: Parameters | None = None
    deadline_ms: Annotated[int, msgspec.Meta(ge=0)] | None = None
    ttl_ms: Annotated[int, msgspec.Meta(ge=1)] | None = None
    reply_to: _Topic | None = None
    priority: Annotated[int, msgspec.Meta(ge=0, le=9)] = 0


class ErrorInfo(msgspec.Struct):
    code: str
    message: str


class Timings(msgspec.Struct):
    queue_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int


class Response(msgspec.Struct, omit_defaults=True):
    id: str
    status: str
    model: str | None = None
    model_version: str | None = None
    outputs: list[Tensor] | None = None
    error: ErrorInfo | None = None
    timings: Timings | None = None


class DlqRecord(msgspec.Struct):
    """A dead-lettered record. ``original_b64`` is the whole original unless ``truncated``:
    then it is a prefix, and ``original_size`` and ``original_sha256`` identify the rest."""

    original_b64: str
    topic: str
    partition: int
    offset: int
    stage: str
    reason: str
    error: str
    attempts: int
    time_ms: int
    request_id: str | None = None
    model: str | None = None
    original_size: int | None = None
    original_sha256: str | None = None
    truncated: bool = False


class ResultRecord(msgspec.Struct, omit_defaults=True):
    """Split mode: what the infer stage hands the respond stage on the results topic."""

    id: str
    model: str
    model_version: str
    outputs: list[Tensor]
    reply_to: str | None = None
    top_k: int | None = None
    fmt: str = JSON
    produced_ms: float = 0.0
    received_ms: float = 0.0
    started_ms: float = 0.0
    inference_ms: float = 0.0
    batch_size: int = 0


class _Probe(msgspec.Struct):
    """What can be salvaged from an invalid request to answer it."""

    id: Any = None
    model: Any = None
    version: Any = None
    reply_to: Any = None


_request_decoder = msgspec.json.Decoder(Request)
_request_decoder_mp = msgspec.msgpack.Decoder(Request)
_response_decoder_mp = msgspec.msgpack.Decoder(Response)
_encoder_mp = msgspec.msgpack.Encoder()
_probe_decoder_mp = msgspec.msgpack.Decoder()
_probe_decoder = msgspec.json.Decoder(_Probe)
_response_decoder = msgspec.json.Decoder(Response)
_dlq_decoder = msgspec.json.Decoder(DlqRecord)
_result_decoder = msgspec.json.Decoder(ResultRecord)
_encoder = msgspec.json.Encoder()


def decode_request(raw: bytes | None, max_payload_bytes: int, fmt: str = JSON) -> Request:
    """Decode and validate one request; raise `RequestError` with a reason on failure."""
    if raw is None:
        raise RequestError(MALFORMED, "empty record (null value)")
    if len(raw) > max_payload_bytes:
        raise RequestError(
            OVERSIZE, f"payload is {len(raw)} bytes, limit is {max_payload_bytes} bytes"
        )
    try:
        if fmt == MSGPACK:
            return _request_decoder_mp.decode(raw)
        return _request_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        probe = _probe(raw, fmt)
        raise RequestError(SCHEMA, str(exc), **probe) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        what = "MessagePack" if fmt == MSGPACK else "JSON"
        raise RequestError(MALFORMED, f"not valid {what}: {exc}") from None


def _probe(raw: bytes, fmt: str = JSON) -> dict[str, Any]:
    try:
        if fmt == MSGPACK:
            p = msgspec.convert(_probe_decoder_mp.decode(raw), _Probe, strict=False)
        else:
            p = _probe_decoder.decode(raw)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return {}

    def text(v: Any, limit: int) -> str | None:
        return v if isinstance(v, str) and 0 < len(v) <= limit else None

    reply_to = text(p.reply_to, 249)
    if reply_to is not None and not all(c.isalnum() or c in "._-" for c in reply_to):
        reply_to = None
    return {
        "request_id": text(p.id, 256),
        "model": text(p.model, 128),
        "version": text(p.version, 64),
        "reply_to": reply_to,
    }


def tensor_to_array(tensor: Tensor, max_elements: int) -> np.ndarray:
    """Turn a request tensor into a numpy array of its datatype and shape."""
    dtype = DTYPES.get(tensor.datatype)
    if dtype is None or tensor.datatype == "BYTES":
        raise RequestError(
            BAD_DTYPE, f"input {tensor.name!r}: unsupported datatype {tensor.datatype!r}"
        )
    expected = math.prod(tensor.shape)  # exact: np.prod wraps around in int64
    if expected > max_elements:
        raise RequestError(
            OVERSIZE, f"input {tensor.name!r} has {expected} elements, limit is {max_elements}"
        )
    if isinstance(tensor.data, bytes):
        return _bytes_to_array(tensor, np.dtype(dtype), expected)
    try:
        array = np.asarray(tensor.data)
    except (ValueError, TypeError) as exc:
        raise RequestError(BAD_SHAPE, f"input {tensor.name!r}: ragged data ({exc})") from None
    if array.dtype == np.object_ or (array.size and array.dtype.kind not in "biuf"):
        raise RequestError(
            BAD_DTYPE, f"input {tensor.name!r}: data must be numbers for {tensor.datatype}"
        )
    want = np.dtype(dtype)
    if want.kind in "iu" and array.size and array.dtype.kind == "f":
        # numpy turns ints beyond int64 (valid UINT64) into floats; keep them exact.
        if want == np.uint64 and all(type(v) is int for v in tensor.data):
            array = np.array(tensor.data, dtype=object)
        else:
            raise RequestError(
                BAD_DTYPE, f"input {tensor.name!r}: {tensor.datatype} data holds non-integers"
            )
    if want.kind in "iu" and array.size:
        # astype wraps integers silently (256 -> 0 in UINT8): check the range first.
        info = np.iinfo(want)
        if int(array.min()) < info.min or int(array.max()) > info.max:
            raise RequestError(
                BAD_DTYPE, f"input {tensor.name!r}: data out of range for {tensor.datatype}"
            )
    if array.size != expected:
        raise RequestError(
            BAD_SHAPE,
            f"input {tensor.name!r}: shape {tensor.shape} needs {expected} elements, "
            f"data has {array.size}",
        )
    with np.errstate(over="raise", invalid="raise"):
        try:
            return array.astype(want, copy=False).reshape(tensor.shape)
        except (FloatingPointError, OverflowError, ValueError) as exc:
            raise RequestError(
                BAD_DTYPE, f"input {tensor.name!r}: data out of range for {tensor.datatype}"
            ) from exc


def _bytes_to_array(tensor: Tensor, dtype: np.dtype, expected: int) -> np.ndarray:
    assert isinstance(tensor.data, bytes)
    if len(tensor.data) != expected * dtype.itemsize:
        raise RequestError(
            BAD_SHAPE,
            f"input {tensor.name!r}: shape {tensor.shape} of {tensor.datatype} needs "
            f"{expected * dtype.itemsize} bytes, data has {len(tensor.data)}",
        )
    array = np.frombuffer(tensor.data, dtype=dtype.newbyteorder("<")).reshape(tensor.shape)
    if dtype.kind == "f" and not np.isfinite(array).all():
        raise RequestError(BAD_DTYPE, f"input {tensor.name!r}: data holds NaN or infinity")
    return array


def array_to_tensor(name: str, array: np.ndarray, raw: bool = False) -> Tensor:
    """A response tensor; ``raw`` puts numeric data as little-endian bytes (MessagePack)."""
    if raw and array.dtype != np.object_:
        raw_bytes = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
        return Tensor(name, DATATYPE_OF[array.dtype.name], list(array.shape), raw_bytes)
    if array.dtype == np.object_:
        data = [v.decode() if isinstance(v, bytes) else str(v) for v in array.reshape(-1)]
        return Tensor(name=name, datatype="BYTES", shape=list(array.shape), data=data)
    return Tensor(
        name=name,
        datatype=DATATYPE_OF[array.dtype.name],
        shape=list(array.shape),
        data=array.reshape(-1).tolist(),
    )


def encode(obj: Any, fmt: str = JSON) -> bytes:
    return _encoder_mp.encode(obj) if fmt == MSGPACK else _encoder.encode(obj)


def decode_response(raw: bytes, fmt: str = JSON) -> Response:
    if fmt == MSGPACK:
        return _response_decoder_mp.decode(raw)
    return _response_decoder.decode(raw)


def tensor_values(tensor: Tensor) -> np.ndarray:
    """A decoded tensor's data as a numpy array of its datatype and shape."""
    if isinstance(tensor.data, bytes):
        dtype = np.dtype(DTYPES[tensor.datatype]).newbyteorder("<")
        return np.frombuffer(tensor.data, dtype=dtype).reshape(tensor.shape)
    return np.asarray(tensor.data, dtype=DTYPES[tensor.datatype]).reshape(tensor.shape)


def decode_result(raw: bytes) -> ResultRecord:
    try:
        return _result_decoder.decode(raw)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(MALFORMED, f"invalid result record: {exc}") from None


def decode_dlq(raw: bytes) -> DlqRecord:
    return _dlq_decoder.decode(raw)


# What a DLQ record keeps of an original too large to carry whole, and of an error text.
DLQ_PREFIX_BYTES = 16_384
DLQ_ERROR_CHARS = 4_096


def dlq_record(
    raw: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    stage: str,
    error: RequestError,
    attempts: int = 1,
    max_bytes: int | None = None,
) -> bytes:
    """The DLQ record for a request that failed with ``error``.

    It keeps the original bytes whole when the record then fits in ``max_bytes`` (what the
    producer accepts); otherwise a prefix of at most `DLQ_PREFIX_BYTES`, flagged
    ``truncated``. Either way it carries the original's size and sha256.
    """
    raw = raw or b""
    record = DlqRecord(
        original_b64="",
        topic=topic,
        partition=partition,
        offset=offset,
        stage=stage,
        reason=error.code,
        error=error.message[:DLQ_ERROR_CHARS],
        attempts=attempts,
        time_ms=int(time.time() * 1000),
        request_id=error.request_id,
        model=error.model,
        original_size=len(raw),
        original_sha256=hashlib.sha256(raw).hexdigest(),
        truncated=False,  # longer than "true": the skeleton's size bounds either
    )
    keep = len(raw)
    if max_bytes is not None:
        room = max_bytes - len(encode(record))
        if _b64_len(keep) > room:
            keep = max(0, min(DLQ_PREFIX_BYTES, room * 3 // 4 - 3))
    record.original_b64 = base64.b64encode(raw[:keep]).decode()
    record.truncated = keep < len(raw)
    return encode(record)


def shrink_dlq(value: bytes) -> bytes:
    """A DLQ record without its original bytes (size and sha256 kept): for a topic whose
    record limit is smaller than the producer's."""
    record = decode_dlq(value)
    if not record.truncated:
        original = base64.b64decode(record.original_b64)
        record.original_size = len(original)
        record.original_sha256 = hashlib.sha256(original).hexdigest()
    record.original_b64 = ""
    record.truncated = True
    return encode(record)


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)
