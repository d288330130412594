"""Bad input: a flood of seeded garbage among valid requests, and a poison request
among its batch neighbours."""

from __future__ import annotations

import base64
import json
import random
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import Producer

from benchmarks.chaos.bombs import bombs
from benchmarks.chaos.common import (
    RssSampler,
    Violations,
    answers,
    no_jit_deprecation,
    prepare,
    running,
    summary,
)
from benchmarks.chaos.garbage import MAX_PAYLOAD_BYTES, GarbageMaker
from benchmarks.harness import TopicReader, Workers, demo_request
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.kafka import producer_config
from pipeline.kafka.produce import produce
from pipeline.models import ModelConfig, ModelRegistry, TensorSpec, init_demo, save_model
from pipeline.protocol import codec

# -- garbage --------------------------------------------------------------------------------


def garbage(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    valid_per_garbage: float = 0.1,
    seed: int = 6_2024,
    with_bombs: bool = True,
) -> dict[str, Any]:
    """``requests`` (default 10k) seeded malformed records mixed with valid requests: the
    worker never dies, every valid request is answered with the model's outputs, every bad
    record lands in the DLQ exactly once with a reason and its original bytes, and bad
    records whose id can be read are answered with the same reason. ``with_bombs``: then
    the compression bombs of `benchmarks.chaos.bombs`, on a worker of their own (``bombs``).

    ``violations`` counts each broken promise (all must be 0); ``examples`` shows a few.
    """
    result = _garbage(settings, work, requests, valid_per_garbage, seed)
    if with_bombs:
        found = bombs(settings, work)
        result["bombs"] = {k: v for k, v in found.items() if k not in ("violations", "examples")}
        result["violations"].update({f"bombs.{k}": v for k, v in found["violations"].items()})
        result["examples"] += found["examples"]
        died = found["violations"]
        result["crashes_unexpected"] += died["worker_died"] + died["restarted_worker_died"]
        result["lost"] += (
            died["dlq_missing"] + died["answer_missing"] + died["restart_answer_missing"]
        )
        result["max_rss_mb"] = max(result["max_rss_mb"], found["max_rss_mb"])
    return result


def _garbage(
    settings: Settings, work: Path, requests: int | None, valid_per_garbage: float, seed: int
) -> dict[str, Any]:
    n_garbage = requests or 10_000
    n_valid = max(1, int(n_garbage * valid_per_garbage))
    settings = prepare(settings, "garbage", work, max_payload_bytes=MAX_PAYLOAD_BYTES)
    bad = Violations(
        ["produce_failed", "not_landed", "valid_wrong", "dlq_missing_or_extra", "dlq_twice",
         "originals_mismatch", "wrong_reason", "wrong_source", "no_error_text",
         "wrong_original", "wrong_request_id", "answer_missing", "answer_twice",
         "answer_wrong_status", "answer_reason_mismatch", "answer_expired_mismatch",
         "unexpected_error_logged"]
    )  # fmt: skip
    items = GarbageMaker(seed).make(n_garbage)
    rng = random.Random(seed + 1)
    features = [[round(rng.uniform(-3, 3), 4) for _ in range(16)] for _ in range(n_valid)]
    expected = (
        ModelRegistry(settings.models_path)
        .resolve("demo")
        .run([np.asarray(features, dtype=np.float32)])[0]
    )
    order = ["g"] * n_garbage + ["v"] * n_valid
    rng.shuffle(order)

    # Where each garbage record landed, from its delivery report: (partition, offset) -> index.
    landed: dict[tuple[int, int], int] = {}
    failed: list[Any] = []

    def delivered(index: int) -> Callable[[Any, Any], None]:
        def report(err: Any, msg: Any) -> None:
            if err is not None:
                failed.append(err)
            else:
                landed[(msg.partition(), msg.offset())] = index

        return report

    producer = Producer(producer_config(settings))
    workers = Workers(settings, "fused", work / "logs" / "w0")
    with (
        Client(settings) as client,
        running(workers.start()),
        RssSampler(lambda: [p.pid for p in workers.procs]) as rss,
    ):
        workers.wait_ready(client)
        futures = []
        g = v = 0
        for what in order:
            if what == "v":
                futures.append(client.submit(demo_request(f"v-{v}", features[v])))
                v += 1
                continue
            item = items[g]
            key = item.key if item.key is not None else None if g % 3 else f"k-{g}".encode()
            produce(producer, settings.requests_topic, item.value, key, item.headers,
                    on_delivery=delivered(g))  # fmt: skip
            producer.poll(0)
            g += 1
        bad.check("produce_failed", producer.flush(60) == 0 and not failed, failed[:3])
        client.flush()
        bad.check("not_landed", len(landed) == n_garbage, len(landed))

        responses = answers(futures, 180)
        for i, r in enumerate(responses):
            ok = (
                r is not None
                and r.id == f"v-{i}"
                and r.status == "ok"
                and r.outputs is not None
                and r.outputs[0].name == "logits"
                and np.allclose(
                    codec.tensor_values(r.outputs[0]), expected[i], rtol=1e-4, atol=1e-5
                )
            )
            bad.check("valid_wrong", ok, r)

        # Every garbage record is in the DLQ once, with its reason and its exact bytes.
        dlq: dict[tuple[int, int], list[codec.DlqRecord]] = {}
        with TopicReader(settings, settings.dlq_topic) as reader:

            def on_dlq(read: Any) -> None:
                record = codec.decode_dlq(read.value)
                dlq.setdefault((record.partition, record.offset), []).append(record)

            reader.read_until(lambda: len(reader.records) >= n_garbage, 180, on_dlq)
            dlq_count = len(reader.records)
        bad.check(
            "dlq_missing_or_extra",
            dlq_count == n_garbage and set(dlq) == set(landed),
            (dlq_count, len(set(dlq) ^ set(landed))),
        )
        originals = Counter(base64.b64decode(r.original_b64) for rs in dlq.values() for r in rs)
        bad.check("originals_mismatch", originals == Counter(i.value or b"" for i in items))
        reasons: Counter[str] = Counter()
        for where, records in dlq.items():
            if where not in landed:
                continue
            item = items[landed[where]]
            bad.check("dlq_twice", len(records) == 1, (item, records))
            record = records[0]
            reasons[record.reason] += 1
            bad.check(
                "wrong_reason",
                record.reason in codec.REASONS and record.reason in item.reasons,
                (item.kind, record.reason, record.error, item.value),
            )
            bad.check(
                "wrong_source",
                record.topic == settings.requests_topic and record.stage == "gateway",
                record,
            )
            bad.check("no_error_text", bool(record.error) and record.attempts >= 1, record)
            bad.check(
                "wrong_original",
                base64.b64decode(record.original_b64) == (item.value or b""),
                item.kind,
            )
            bad.check("wrong_request_id", record.request_id == item.answer_id, (item, record))

        # Garbage whose id could be read was answered, with the same reason.
        answerable = {item.answer_id: item for item in items if item.answer_id is not None}
        by_reason_id = {(r.request_id, r.reason) for rs in dlq.values() for r in rs}
        replies: dict[str, list[codec.Response]] = {}
        with TopicReader(settings, settings.responses_topic, keep=False) as reader:

            def on_response(read: Any) -> None:
                response = codec.decode_response(read.value)
                if response.id in answerable:
                    replies.setdefault(response.id, []).append(response)

            reader.read_until(lambda: len(replies) >= len(answerable), 120, on_response)
        bad.check(
            "answer_missing",
            set(replies) == set(answerable),
            sorted(set(answerable) - set(replies))[:5],
        )
        for request_id, got in replies.items():
            bad.check("answer_twice", len(got) == 1, got)
            response = got[0]
            error = response.error
            bad.check(
                "answer_wrong_status",
                response.status in ("error", "expired") and error is not None,
                response,
            )
            if error is not None:
                bad.check(
                    "answer_reason_mismatch", (request_id, error.code) in by_reason_id, response
                )
                bad.check(
                    "answer_expired_mismatch",
                    (response.status == "expired") == (error.code == codec.EXPIRED),
                    response,
                )
        alive = workers.alive()
        logs = workers.logs()
    # Every record was handled by a known reason, never by the catch-all for surprises.
    bad.check("unexpected_error_logged", "unexpected error admitting" not in logs, logs[-2000:])
    answered = sum(r is not None for r in responses)
    dlq_lost = len(set(landed) - set(dlq)) + (n_garbage - len(landed))
    return {
        **summary(
            n_garbage + n_valid,
            answered,
            n_valid - answered + dlq_lost,
            sum(len(rs) - 1 for rs in dlq.values()),
            dlq_count,
            0,
            int(not alive),
            rss.max_mb,
        ),
        "garbage": n_garbage,
        "valid": n_valid,
        "answered_bad": len(replies),
        "answerable_bad": len(answerable),
        "kinds": dict(Counter(item.kind for item in items)),
        "dlq_reasons": dict(reasons),
        "violations": bad.counts,
        "examples": bad.examples,
    }


# -- poison ---------------------------------------------------------------------------------

POISON = 666.0


class PoisonModel(torch.nn.Module):
    """``2x + 1``, except that any input holding 666 makes forward raise."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 666.0).any()):
            raise ValueError("poison input")
        return x * 2.0 + 1.0


def poison(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """Three rounds of one poison request among ``requests`` (default 50) neighbours, the
    poison first, in the middle, last: it fails alone (``model_error``, in the DLQ), its
    neighbours are answered, in batches.

    ``rounds`` lists each round's poison position and neighbour batch sizes; ``violations``
    counts each broken promise (all must be 0).
    """
    neighbours = requests or 50
    model_dir = work / "poison-models"
    init_demo(model_dir)  # the readiness probes ask the demo model
    config = ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("x", "FP32", (4,)),),
        outputs=(TensorSpec("y", "FP32", (4,)),),
    )
    with no_jit_deprecation():
        save_model(model_dir, "poison", "1", PoisonModel(), config)
    # One partition and a wide window: each round's requests are consumed as one batch.
    settings = prepare(
        settings.replace(model_dir=model_dir), "poison", work, partitions=1, max_delay_s=1.0
    )
    bad = Violations(
        ["unanswered", "poison_not_failed", "neighbour_failed", "wrong_output", "no_timings",
         "neighbour_count", "not_batched", "partial_batches", "dlq_ids", "dlq_record"]
    )  # fmt: skip

    def request(request_id: str, values: list[float]) -> bytes:
        tensor = {"name": "x", "datatype": "FP32", "shape": [4], "data": values}
        return json.dumps({"id": request_id, "model": "poison", "inputs": [tensor]}).encode()

    sent: dict[str, bytes] = {}
    rounds = []
    answered = 0
    workers = Workers(settings, "fused", work / "logs" / "w0")
    with (
        Client(settings) as client,
        running(workers.start()),
        RssSampler(lambda: [p.pid for p in workers.procs]) as rss,
    ):
        workers.wait_ready(client)
        for round_, position in enumerate((0, neighbours // 2, neighbours)):
            futures = {}
            for i in range(neighbours + 1):
                request_id = f"r{round_}-{i}"
                values = [float(i), 1.0, -2.5, POISON if i == position else 3.0]
                sent[request_id] = request(request_id, values)
                futures[request_id] = (client.submit_raw(request_id, sent[request_id]), values)
            client.flush()
            sizes: Counter[int] = Counter()
            results = answers([f for f, _ in futures.values()], 60)
            for (request_id, (_, values)), response in zip(futures.items(), results, strict=True):
                bad.check(
                    "unanswered", response is not None and response.id == request_id, request_id
                )
                if response is None:
                    continue
                answered += 1
                if request_id == f"r{round_}-{position}":
                    error = response.error
                    bad.check(
                        "poison_not_failed",
                        response.status == "error"
                        and error is not None
                        and error.code == codec.MODEL_ERROR
                        and "poison input" in error.message,
                        response,
                    )
                    continue
                bad.check("neighbour_failed", response.status == "ok", response)
                outputs = response.outputs
                bad.check(
                    "wrong_output",
                    outputs is not None
                    and outputs[0].name == "y"
                    and outputs[0].data == [2.0 * v + 1.0 for v in values],
                    response,
                )
                bad.check("no_timings", response.timings is not None, response)
                if response.timings is not None:
                    sizes[response.timings.batch_size] += 1
            # The neighbours ran in batches (a failing batch is split, not run one by one),
            # and each batch size s accounts for a whole number of batches of s requests.
            bad.check("neighbour_count", sum(sizes.values()) == neighbours, sizes)
            bad.check("not_batched", bool(sizes) and max(sizes) >= neighbours // 4, sizes)
            bad.check("partial_batches", all(c % s == 0 for s, c in sizes.items()), sizes)
            rounds.append({"poison_at": position, "batch_sizes": dict(sorted(sizes.items()))})
        alive = workers.alive()

    with TopicReader(settings, settings.dlq_topic) as reader:
        reader.read_until(lambda: len(reader.records) >= 3, 60)
        dlq = [codec.decode_dlq(r.value or b"") for r in reader.records]
    want = ["r0-0", f"r1-{neighbours // 2}", f"r2-{neighbours}"]
    bad.check("dlq_ids", sorted(r.request_id or "" for r in dlq) == sorted(want), dlq)
    for record in dlq:
        bad.check(
            "dlq_record",
            record.reason == codec.MODEL_ERROR
            and record.model == "poison"
            and record.stage == "infer"
            and "poison input" in record.error
            and record.request_id is not None
            and base64.b64decode(record.original_b64) == sent.get(record.request_id),
            record,
        )
    return {
        **summary(
            len(sent), answered, len(sent) - answered, 0, len(dlq), 0, int(not alive), rss.max_mb
        ),
        "neighbours": neighbours,
        "rounds": rounds,
        "violations": bad.counts,
        "examples": bad.examples,
    }
