"""Wire formats: request, response and inter-stage records (JSON or MessagePack, per
schemas/).

Decoding is strict (msgspec structs that mirror the JSON Schemas) and every failure is a
`RequestError` with a reason code, so that callers can route it to the DLQ. The reason
codes (`reasons`), tensors (`tensors`) and DLQ records (`dlq`) have rooms of their own;
this module hands their names on too, as `codec.X`.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any

import msgspec

from pipeline.protocol.dlq import (  # noqa: F401 - handed on as codec.X
    DLQ_ERROR_CHARS,
    DLQ_PREFIX_BYTES,
    DlqRecord,
    decode_dlq,
    dlq_record,
    shrink_dlq,
)
from pipeline.protocol.reasons import (  # noqa: F401 - handed on as codec.X
    BAD_DTYPE,
    BAD_FIELD,
    BAD_IMAGE,
    BAD_SHAPE,
    DELIVERY_FAILED,
    EXPIRED,
    FEATURE_UNAVAILABLE,
    FORBIDDEN_REPLY_TO,
    INVALID_UTF8,
    KEY_TOO_LARGE,
    MALFORMED,
    MODEL_ERROR,
    OVERSIZE,
    REASONS,
    RECORD_TOO_LARGE,
    SCHEMA,
    TEXT_TOO_LONG,
    TOO_MANY_HEADERS,
    UNKNOWN_KEY,
    UNKNOWN_MODEL,
    UNKNOWN_VERSION,
    Reason,
    RequestError,
)
from pipeline.protocol.tensors import (  # noqa: F401 - handed on as codec.X
    DATATYPE_OF,
    DTYPES,
    Tensor,
    array_to_tensor,
    tensor_to_array,
    tensor_values,
)

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


# A model's name and a reply topic match this (schemas/request.schema.json). The decoder
# does not check it: `decode_request` does, once per distinct name (`_check_names`), where
# msgspec would run the expression on every request, a third of its decoding time.
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_Topic = Annotated[str, msgspec.Meta(min_length=1, max_length=249)]


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
    # Notes on how the request was served, e.g. {"truncated": true} when its text was cut
    # to the model's maximum length.
    parameters: dict[str, Any] | None = None
    # The experiment variant that served it (pipeline/experiments), if its model has one.
    variant: str | None = None


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
    parameters: dict[str, Any] | None = None
    # The experiment variant, and a mirrored request's role ("primary" or "shadow").
    variant: str | None = None
    role: str | None = None


class ShadowRecord(msgspec.Struct, omit_defaults=True):
    """One side of a mirrored request on the shadow topic, keyed by request id: the
    primary's outputs and the shadow's, side by side (`sluice experiment report`)."""

    id: str
    model: str
    model_version: str
    variant: str
    role: str  # "primary" or "shadow"
    status: str
    outputs: list[Tensor] | None = None
    error: ErrorInfo | None = None
    total_ms: float = 0.0


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
_result_decoder = msgspec.json.Decoder(ResultRecord)
_shadow_decoder = msgspec.json.Decoder(ShadowRecord)
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
        request = (_request_decoder_mp if fmt == MSGPACK else _request_decoder).decode(raw)
    except msgspec.ValidationError as exc:
        probe = _probe(raw, fmt)
        raise RequestError(SCHEMA, str(exc), **probe) from None
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        what = "MessagePack" if fmt == MSGPACK else "JSON"
        raise RequestError(MALFORMED, f"not valid {what}: {exc}") from None
    if request.reply_to is not None or request.model not in _VALID_NAMES:
        _check_names(request, raw, fmt)
    return request


_NAME = re.compile(NAME_PATTERN)
_VALID_NAMES: set[str] = set()  # names that matched, at most _VALID_NAMES_MAX of them
_VALID_NAMES_MAX = 4096


def _check_names(request: Request, raw: bytes, fmt: str) -> None:
    """The model's name and the reply topic match `NAME_PATTERN`, as the decoder would have
    had them (``search``, its way; the same error)."""
    for field, name in (("model", request.model), ("reply_to", request.reply_to)):
        if name is None or name in _VALID_NAMES:
            continue
        if _NAME.search(name) is None:
            message = f"Expected `str` matching regex {NAME_PATTERN!r} - at `$.{field}`"
            raise RequestError(SCHEMA, message, **_probe(raw, fmt))
        if len(_VALID_NAMES) < _VALID_NAMES_MAX:
            _VALID_NAMES.add(name)


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


def encode(obj: Any, fmt: str = JSON) -> bytes:
    return _encoder_mp.encode(obj) if fmt == MSGPACK else _encoder.encode(obj)


def encode_lines(values: list[Any]) -> list[bytes]:
    """Each value in JSON, as `encode` makes it, in one call (JSON text never holds a raw
    newline: msgspec writes one between values)."""
    return _encoder.encode_lines(values).split(b"\n")[:-1]


def decode_response(raw: bytes, fmt: str = JSON) -> Response:
    if fmt == MSGPACK:
        return _response_decoder_mp.decode(raw)
    return _response_decoder.decode(raw)


def decode_shadow(raw: bytes) -> ShadowRecord:
    """A shadow-topic record (always JSON: `Responses._shadow_record`)."""
    return _shadow_decoder.decode(raw)


def decode_result(raw: bytes) -> ResultRecord:
    try:
        return _result_decoder.decode(raw)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError) as exc:
        raise RequestError(MALFORMED, f"invalid result record: {exc}") from None
