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

Seconds on a shared machine move by more than most changes do: ``--instructions`` counts
each step's instructions per request under callgrind instead (`instructions`), the same
count however busy the machine is, so two commits compare in one run each.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import shutil
import subprocess
import sys
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
from pipeline.engines.offsets import ConsumedBatch, OffsetTracker
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


STEPS = ("consume", "admit", "compute", "respond", "publish")


class FusedPath:
    """One consumed batch of demo requests and the fused path's steps on it, each taking
    the previous step's result (so any step may run again on its own)."""

    def __init__(self, settings: Settings, batch: int, payload: str) -> None:
        torch.set_num_threads(settings.torch_threads)
        registry = ModelRegistry(settings.models_path, max_batch_size=max(batch, 1))
        self.pipeline = Pipeline(settings, registry, None, Metrics())
        fmt = codec.MSGPACK if payload == "msgpack" else codec.JSON
        load = Load.build(registry, "demo", fmt)
        headers = load.headers or []
        now = time.time() * 1000
        self.messages = [
            Message(topic=settings.requests_topic, partition=0, offset=i, key=b"user",
                    value=value, headers=headers or None, timestamp=(1, int(now)))
            for i, value in enumerate(load.request(i, "r")[1] for i in range(batch))
        ]  # fmt: skip
        self.producer = _Producer()
        self.out = Publisher(self.producer, self.pipeline, None, transactional=False)
        self.tracker = OffsetTracker(None)
        self.consume()
        self.admit()
        self.compute()
        self.respond()

    def consume(self) -> None:
        self.origins, self.offsets = origins_of(self.messages)
        self.batch: ConsumedBatch | None = self.tracker.open(self.offsets)

    def admit(self) -> None:
        self.admitted = self.pipeline.admit_many(self.origins)

    def compute(self) -> None:
        self.outcomes = self.pipeline.finish(self.pipeline.start(self.admitted))  # type: ignore[arg-type]

    def respond(self) -> None:
        self.publications = self.pipeline.response_records(self.outcomes, "infer")

    def publish(self) -> None:
        # Run again on its own, it publishes for a batch opened anew (as `consume` does).
        batch = self.batch or self.tracker.open(self.offsets)
        self.batch = None
        for origin, records in self.publications:
            self.out.send(records, batch, origin)
        self.producer.poll(0)
        self.tracker.settle(lambda offsets: None)
        assert not self.tracker.pending


@contextlib.contextmanager
def fused_path(batch: int, payload: str) -> Iterator[FusedPath]:
    with tempfile.TemporaryDirectory(prefix="sluice-cost-") as tmp:
        settings = Settings.from_env().replace(model_dir=Path(tmp))
        init_demo(settings.models_path)
        yield FusedPath(settings, batch, payload)


def measure(
    batch: int = 64, rounds: int = 60, repeats: int = 15, payload: str = "json"
) -> dict[str, Any]:
    """µs of CPU per request in each step, the best of ``repeats`` rounds of ``rounds``."""
    with fused_path(batch, payload) as path:
        steps = [getattr(path, name) for name in STEPS]

        def once() -> list[float]:
            seconds = []
            for step in steps:
                t0 = time.thread_time()
                step()
                seconds.append(time.thread_time() - t0)
            return seconds

        for _ in range(rounds):  # warm up: the model's first calls, the allocator
            once()
        best: list[float] | None = None
        with worker_gc():
            for _ in range(repeats):
                total = [0.0] * len(STEPS)
                for _ in range(rounds):
                    for k, seconds in enumerate(once()):
                        total[k] += seconds
                us = [s / rounds / batch * 1e6 for s in total]
                if best is None or sum(us) < sum(best):
                    best = us
    assert best is not None
    out: dict[str, Any] = {"scenario": "cost", "payload": payload, "batch": batch}
    out |= {f"{name}_us": round(v, 2) for name, v in zip(STEPS, best, strict=True)}
    out["total_us"] = round(sum(best), 2)
    return out


# Callgrind's client requests, for the measured stretches alone (valgrind/callgrind.h).
_TOGGLE_C = """
#include <valgrind/callgrind.h>
void sluice_cost_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void sluice_cost_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; CALLGRIND_DUMP_STATS; }
"""


def instructions(batch: int = 64, rounds: int = 20, payload: str = "json") -> dict[str, Any]:
    """Instructions per request in each step, counted by callgrind: unlike seconds, the same
    count on a busy machine as on an idle one, so two commits compare in one run each.

    This process compiles callgrind's start and stop requests into a small library (a C
    compiler and valgrind's headers) and runs `counted` under ``valgrind --tool=callgrind``,
    which counts only between them: ``rounds`` runs of each step, after a warm-up."""
    if shutil.which("valgrind") is None or shutil.which("cc") is None:
        raise SystemExit("--instructions needs valgrind and a C compiler (cc) on PATH")
    with tempfile.TemporaryDirectory(prefix="sluice-callgrind-") as tmp:
        source, library = Path(tmp) / "toggle.c", Path(tmp) / "libtoggle.so"
        source.write_text(_TOGGLE_C)
        subprocess.run(["cc", "-O1", "-shared", "-fPIC", "-o", library, source], check=True)
        command = [
            "valgrind", "--tool=callgrind", "--instr-atstart=no",
            f"--callgrind-out-file={tmp}/out.%p", sys.executable, "-m", "benchmarks.cost",
            "--counted", str(library), "--batch", str(batch), "--rounds", str(rounds),
            "--payload", payload,
        ]  # fmt: skip
        # One hash seed: dict and set layouts, and so the counts, the same run to run.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        subprocess.run(
            command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        dumps = sorted(Path(tmp).glob("out.*.*"), key=lambda p: int(p.name.rsplit(".", 1)[1]))
        totals = [_callgrind_total(p) for p in dumps]
    if len(totals) != len(STEPS):
        raise RuntimeError(f"callgrind wrote {len(totals)} counts for {len(STEPS)} steps")
    per_request = [t / rounds / batch for t in totals]
    out: dict[str, Any] = {"scenario": "cost-instructions", "payload": payload, "batch": batch}
    out |= {f"{name}_ir": round(v) for name, v in zip(STEPS, per_request, strict=True)}
    out["total_ir"] = round(sum(per_request))
    return out


def counted(library: str, batch: int, rounds: int, payload: str) -> None:
    """Under callgrind: each step ``rounds`` times between the library's start and stop."""
    toggle = ctypes.CDLL(library)
    with fused_path(batch, payload) as path, worker_gc():
        for name in STEPS:
            step = getattr(path, name)
            for _ in range(10):  # warm up
                step()
            toggle.sluice_cost_start()
            for _ in range(rounds):
                step()
            toggle.sluice_cost_stop()


def _callgrind_total(dump: Path) -> int:
    """A dump's instruction count: its ``totals:`` line (``summary:`` stays 0 in a dump
    made by a client request)."""
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


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
    times = tuple(np.round(rng.exponential(5.0, (3, batch)), 3).tolist())
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
    parser.add_argument("--rounds", type=int, default=20, help="each step's runs, counted")
    parser.add_argument("--payload", choices=["json", "msgpack"], default="json")
    parser.add_argument(
        "--answers", action="store_true", help="the JSON answers' encoding alone, two ways"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="instructions per step (callgrind)"
    )
    parser.add_argument("--counted", help=argparse.SUPPRESS)  # the run under callgrind
    args = parser.parse_args()
    if args.counted:
        counted(args.counted, args.batch, args.rounds, args.payload)
    elif args.answers:
        print(json.dumps(answers(args.batch)))
    elif args.instructions:
        print(json.dumps(instructions(args.batch, args.rounds, args.payload)))
    else:
        print(json.dumps(measure(args.batch, repeats=args.repeats, payload=args.payload)))


if __name__ == "__main__":
    main()
