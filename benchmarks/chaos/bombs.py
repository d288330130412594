"""Compression bombs: records a few KB on the wire that decompress to far more than the
payload limit (64 MiB of spaces, by default, under zstd, lz4 and gzip).

The worker must reject each one without dying, dead-letter it truncated (a prefix, its size
and its sha256: the whole original could never be produced again), answer the requests
after it, keep its memory bounded, and a worker killed and restarted afterwards must read
past the bombs instead of dying on them again.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

from confluent_kafka import Producer

from benchmarks.chaos.common import RssSampler, Violations, answers, prepare, running
from benchmarks.harness import TopicReader, Workers, demo_request
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.kafka import producer_config
from pipeline.protocol import codec

BOMB_BYTES = 64 * 1024 * 1024
CODECS = ("zstd", "lz4", "gzip")
VIOLATIONS = [
    "bomb_not_produced", "worker_died", "answer_missing", "dlq_missing", "dlq_not_truncated",
    "dlq_wrong_size", "dlq_wrong_sha256", "dlq_wrong_prefix", "dlq_wrong_reason",
    "dlq_wrong_source", "restart_answer_missing", "restarted_worker_died",
]  # fmt: skip


def send_bomb(settings: Settings, compression: str, size_bytes: int, key: bytes) -> tuple[int, int]:
    """Produce one record of ``size_bytes`` spaces compressed with ``compression``; returns
    its (partition, offset)."""
    producer = Producer(
        producer_config(
            settings,
            **{
                "compression.type": compression,
                # librdkafka checks the uncompressed size against this; the broker checks
                # the compressed batch against its own (8 MiB) limit.
                "message.max.bytes": size_bytes + 65_536,
                "batch.size": size_bytes + 65_536,
            },
        )
    )
    landed: list[Any] = []
    producer.produce(
        settings.requests_topic, b" " * size_bytes, key,
        on_delivery=lambda err, msg: landed.append(err or (msg.partition(), msg.offset())),
    )  # fmt: skip
    producer.flush(60)
    if not landed or not isinstance(landed[0], tuple):
        raise RuntimeError(f"the {compression} bomb was not produced: {landed}")
    return landed[0]


def bombs(
    settings: Settings,
    work: Path,
    size_bytes: int = BOMB_BYTES,
    codecs: tuple[str, ...] = CODECS,
    requests_after: int = 10,
) -> dict[str, Any]:
    """One fused worker fed a bomb per codec, each followed by ``requests_after`` ordinary
    requests; then the worker is killed (SIGKILL) and a new one must answer new requests.

    ``violations`` counts each broken promise (all must be 0); ``max_rss_mb`` is the worker's
    peak resident memory, sampled every 50 ms, beside ``idle_rss_mb`` before the first bomb.
    """
    settings = prepare(settings, "bombs", work)
    bad = Violations(VIOLATIONS)
    expected_sha = hashlib.sha256(b" " * size_bytes).hexdigest()
    where: dict[tuple[int, int], str] = {}
    workers = Workers(settings, "fused", work / "logs" / "bombs-0")
    with Client(settings) as client:
        with running(workers.start()), RssSampler(workers_pids(workers), 0.05) as rss:
            workers.wait_ready(client)
            idle_rss_mb = rss.sample()
            futures = []
            for compression in codecs:
                try:
                    position = send_bomb(settings, compression, size_bytes, compression.encode())
                    where[position] = compression
                except RuntimeError as exc:
                    bad.check("bomb_not_produced", False, str(exc))
                futures += [
                    client.submit(demo_request(f"after-{compression}-{i}"))
                    for i in range(requests_after)
                ]
            client.flush()
            got = answers(futures, 120)
            for r in got:
                bad.check("answer_missing", r is not None and r.status == "ok", r)
            dlq = _read_dlq(settings, len(where))
            bad.check("worker_died", workers.alive(), workers.logs()[-2000:])
            max_rss_mb = rss.max_mb
            workers.kill()  # a crash: whatever offsets were not committed are read again
        # A new worker in the same group starts from the committed offsets.
        again = Workers(settings, "fused", work / "logs" / "bombs-1")
        with running(again.start()):
            again.wait_ready(client)
            after = answers(
                [client.submit(demo_request(f"restart-{i}")) for i in range(requests_after)], 120
            )
            for r in after:
                bad.check("restart_answer_missing", r is not None and r.status == "ok", r)
            bad.check("restarted_worker_died", again.alive(), again.logs()[-2000:])

    seen: dict[str, codec.DlqRecord] = {}
    for record in dlq:
        which = where.get((record.partition, record.offset))
        if which is None:
            continue
        seen[which] = record
        prefix = base64.b64decode(record.original_b64)
        bad.check("dlq_not_truncated", record.truncated, which)
        bad.check("dlq_wrong_size", record.original_size == size_bytes, record.original_size)
        bad.check("dlq_wrong_sha256", record.original_sha256 == expected_sha, which)
        bad.check(
            "dlq_wrong_prefix",
            0 < len(prefix) <= codec.DLQ_PREFIX_BYTES and prefix == b" " * len(prefix),
            len(prefix),
        )
        bad.check("dlq_wrong_reason", record.reason == codec.OVERSIZE, record.reason)
        bad.check(
            "dlq_wrong_source",
            record.topic == settings.requests_topic and record.stage == "gateway",
            record.topic,
        )
    for which in where.values():
        bad.check("dlq_missing", which in seen, which)
    return {
        "sent": len(codecs) * (1 + requests_after) + requests_after,
        "bombs": {c: {"partition": p, "offset": o} for (p, o), c in where.items()},
        "bomb_bytes": size_bytes,
        "dlq_records": len(dlq),
        "dlq_record_bytes": {c: len(codec.encode(r)) for c, r in seen.items()},
        "idle_rss_mb": round(idle_rss_mb, 1),
        "max_rss_mb": round(max_rss_mb, 1),
        "violations": bad.counts,
        "examples": bad.examples,
    }


def workers_pids(workers: Workers) -> Any:
    return lambda: [p.pid for p in workers.procs]


def _read_dlq(settings: Settings, expected: int) -> list[codec.DlqRecord]:
    records: list[codec.DlqRecord] = []
    with TopicReader(settings, settings.dlq_topic) as reader:

        def on_record(read: Any) -> None:
            records.append(codec.decode_dlq(read.value))

        reader.read_until(lambda: len(records) >= expected, 60, on_record)
    return records
