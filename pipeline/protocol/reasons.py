"""Reason codes: why a request ended without outputs, and the error that carries one."""

from __future__ import annotations

from enum import StrEnum

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
    # Inputs prepared on the worker: text that is not UTF-8, text longer than the model's
    # maximum with truncation off, an image that cannot be decoded, a record's field
    # missing, unexpected or of the wrong type (the message names the field).
    INVALID_UTF8 = "invalid_utf8"
    TEXT_TOO_LONG = "text_too_long"
    BAD_IMAGE = "bad_image"
    BAD_FIELD = "bad_field"
    # The record around the request: a ``reply_to`` outside the allowlist, a key or headers
    # past their limits (max_key_bytes; max_headers, max_header_bytes).
    FORBIDDEN_REPLY_TO = "forbidden_reply_to"
    KEY_TOO_LARGE = "key_too_large"
    TOO_MANY_HEADERS = "too_many_headers"


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
INVALID_UTF8 = Reason.INVALID_UTF8
TEXT_TOO_LONG = Reason.TEXT_TOO_LONG
BAD_IMAGE = Reason.BAD_IMAGE
BAD_FIELD = Reason.BAD_FIELD
FORBIDDEN_REPLY_TO = Reason.FORBIDDEN_REPLY_TO
KEY_TOO_LARGE = Reason.KEY_TOO_LARGE
TOO_MANY_HEADERS = Reason.TOO_MANY_HEADERS
REASONS = tuple(r.value for r in Reason)


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
        variant: str | None = None,
    ) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.request_id = request_id
        self.model = model
        self.version = version
        self.reply_to = reply_to
        self.attempts = attempts
        self.variant = variant  # the experiment variant that served it, if any
