"""The worker's own cost per request, without Kafka: ``python -m benchmarks.cost``.

One consumed batch of demo requests (JSON, as `sluice bench` sends them) goes through the
fused path's steps in this process, over and over: consume (the consumer's `Message`s into
origins, the batch opened for its offsets), admission (decode, validate, resolve the model,
make the job), compute (stack, run the model, take the outputs), respond (postprocess and
encode each answer) and publish (each answer handed to a producer that takes it at once
and reports its delivery on the next poll, the batch's offsets settled). Only librdkafka
and the loop's turns are left out. Each step's CPU time on this thread
(``time.thread_time``: other processes on a shared machine slow it less than they slow the
wall clock) is divided by the requests, and the best of ``--repeats`` rounds is kept: the
least disturbed. The garbage collector runs as in a worker (`worker_gc`): its passes are
part of the cost. Run it on two commits in turn to compare them; `sluice bench` reports the
whole worker's CPU per request with Kafka (``worker_cpu_us_per_request``).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from confluent_kafka import Message

from benchmarks.bench import Load
from pipeline.config import Settings
from pipeline.engines.batch import origins_of
from pipeline.engines.offsets import OffsetTracker
from pipeline.engines.publisher import Publisher
from pipeline.engines.worker import settle_collector
from pipeline.models import ModelRegistry, init_demo
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.serving import Pipeline


@contextlib.contextmanager
def worker_gc() -> Iterator[None]:
    """The garbage collector as a batch engine worker runs it (`settle_collector`), this
    process's own restored after."""
    thresholds = gc.get_threshold()
    settle_collector()
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()


class _Producer:
    """librdkafka's producer as the publish step meets it: each record taken at once, its
    delivery (a success) reported on the next `poll`, as a `Message` like librdkafka's."""

    def __init__(self) -> None:
        self._reports: list[tuple[Any, Message]] = []

    def produce(self, topic: str, value: Any = None, key: Any = None, partition: int = -1,
                headers: Any = None, on_delivery: Any = None) -> None:  # fmt: skip
        if on_delivery is not None:
            report = Message(topic=topic, partition=0, value=value, key=key, headers=headers)
            self._reports.append((on_delivery, report))

    def poll(self, timeout: float = 0) -> int:
        reports, self._reports = self._reports, []
        for on_delivery, message in reports:
            on_delivery(None, message)
        return len(reports)


def measure(
    batch: int = 64, rounds: int = 60, repeats: int = 15, payload: str = "json"
) -> dict[str, Any]:
    """µs of CPU per request in each step, the best of ``repeats`` rounds of ``rounds``."""
    with tempfile.TemporaryDirectory(prefix="sluice-cost-") as tmp:
        settings = Settings.from_env().replace(model_dir=Path(tmp))
        init_demo(settings.models_path)
        torch.set_num_threads(settings.torch_threads)
        registry = ModelRegistry(settings.models_path, max_batch_size=max(batch, 1))
        pipeline = Pipeline(settings, registry, None, Metrics())
        fmt = codec.MSGPACK if payload == "msgpack" else codec.JSON
        load = Load.build(registry, "demo", fmt)
        headers = load.headers or []
        now = time.time() * 1000
        messages = [
            Message(topic=settings.requests_topic, partition=0, offset=i, key=b"user",
                    value=value, headers=headers or None, timestamp=(1, int(now)))
            for i, value in enumerate(load.request(i, "r")[1] for i in range(batch))
        ]  # fmt: skip
        producer = _Producer()
        out = Publisher(producer, pipeline, None, transactional=False)
        tracker = OffsetTracker(None)

        def once() -> list[float]:
            t0 = time.thread_time()
            origins, consumed = origins_of(messages)
            consumed_batch = tracker.open(consumed)
            t1 = time.thread_time()
            admitted = pipeline.admit_many(origins)
            t2 = time.thread_time()
            outcomes = pipeline.finish(pipeline.start(admitted))  # type: ignore[arg-type]
            t3 = time.thread_time()
            publications = pipeline.response_records(outcomes, "infer")
            t4 = time.thread_time()
            for origin, records in publications:
                out.send(records, consumed_batch, origin)
            producer.poll(0)
            tracker.settle(lambda offsets: None)
            return [t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.thread_time() - t4]

        for _ in range(rounds):  # warm up: the model's first calls, the allocator
            once()
        best: list[float] | None = None
        with worker_gc():
            for _ in range(repeats):
                total = [0.0] * 5
                for _ in range(rounds):
                    for k, seconds in enumerate(once()):
                        total[k] += seconds
                us = [s / rounds / batch * 1e6 for s in total]
                if best is None or sum(us) < sum(best):
                    best = us
        assert best is not None and not tracker.pending
    consume, admit, compute, respond, publish = (round(v, 2) for v in best)
    return {
        "scenario": "cost",
        "payload": payload,
        "batch": batch,
        "consume_us": consume,
        "admit_us": admit,
        "compute_us": compute,
        "respond_us": respond,
        "publish_us": publish,
        "total_us": round(sum(best), 2),
    }


def answers(batch: int = 64, repeats: int = 20) -> dict[str, Any]:
    """µs of CPU per answer to encode a batch of the demo's JSON answers: each `Response`
    built and encoded (`_answers`, what requests with parameters, a variant or MessagePack
    get) against the joined template (`_json_answers`), interleaved in this process."""
    import numpy as np

    from pipeline.serving.responses import Answers, _answers, _json_answers, _top_k

    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (batch, 4)).astype(np.float32)
    raw: list[Any] = [("logits", "FP32", [4], logits.tolist(), None)]
    top = _top_k(("a", "b", "c", "d"), [logits], [1] * batch)
    times = np.round(rng.exponential(5.0, (batch, 3)), 3).tolist()
    metas = [
        codec.ResultRecord(id=f"r{i}", model="demo", model_version="2", outputs=[],
                           batch_size=batch)
        for i in range(batch)
    ]  # fmt: skip
    batch_answers = Answers("demo", "2", raw, top, times, metas)
    calls = {
        "responses_us": lambda: _answers(batch_answers, [False] * batch),
        "template_us": lambda: _json_answers(batch_answers),
    }
    assert calls["responses_us"]() == calls["template_us"]()
    best = dict.fromkeys(calls, float("inf"))
    for _ in range(repeats):
        for name, call in calls.items():
            t0 = time.thread_time()
            for _ in range(100):
                call()
            best[name] = min(best[name], (time.thread_time() - t0) / 100 / batch * 1e6)
    out: dict[str, Any] = {"scenario": "cost-answers", "batch": batch}
    out |= {k: round(v, 3) for k, v in best.items()}
    out["template_over_responses"] = round(best["template_us"] / best["responses_us"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description="The fused path's CPU per request.")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--payload", choices=["json", "msgpack"], default="json")
    parser.add_argument(
        "--answers", action="store_true", help="the JSON answers' encoding alone, two ways"
    )
    args = parser.parse_args()
    if args.answers:
        print(json.dumps(answers(args.batch)))
        return
    print(json.dumps(measure(args.batch, repeats=args.repeats, payload=args.payload)))


if __name__ == "__main__":
    main()
