"""DLQ records: a failed record's bytes (whole, or a prefix with its size and sha256 when
too large to carry), its source and its reason."""

from __future__ import annotations

import base64
import hashlib
import time

import msgspec

from pipeline.protocol.reasons import RequestError


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


_dlq_decoder = msgspec.json.Decoder(DlqRecord)
_encoder = msgspec.json.Encoder()


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
        room = max_bytes - len(_encoder.encode(record))
        if _b64_len(keep) > room:
            keep = max(0, min(DLQ_PREFIX_BYTES, room * 3 // 4 - 3))
    record.original_b64 = base64.b64encode(raw[:keep]).decode()
    record.truncated = keep < len(raw)
    return _encoder.encode(record)


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
    return _encoder.encode(record)


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)
