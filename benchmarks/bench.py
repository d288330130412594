"""``sluice bench``: open-loop load through a real pipeline, one JSON summary at the end.

Modes: ``fused`` and ``split`` (the sluice pipeline), ``naive`` (one request at a time, each
send awaited) and ``relay`` (bare confluent-kafka consume-to-produce with no model: the
ceiling the broker and client allow on this machine). Every answered request is checked
against the model's direct output on the same input.
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import gc
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from confluent_kafka import Consumer, Producer

from benchmarks import loadgen
from pipeline.config import Settings
from pipeline.engines.offsets import ConsumedBatch, OffsetTracker
from pipeline.kafka import (
    confluent_config,
    consume_batch,
    consumer_config,
    delete_topics,
    ensure_topics,
    pipeline_topics,
    producer_config,
    topic_reader,
)
from pipeline.kafka.produce import produce
from pipeline.models import DEMO_TEXTS, LoadedModel, ModelRegistry
from pipeline.ops import procs
from pipeline.protocol import codec

MODES = ("fused", "split", "naive", "relay", "guarded-relay", "per-message")
VARIANTS = 64
PAYLOADS = {"json": codec.JSON, "msgpack": codec.MSGPACK}


@dataclass
class Load:
    """The requests of one run: a few distinct inputs, and the model's direct outputs."""

    model: str
    version: str
    payloads: list[Any]
    expected: np.ndarray  # [VARIANTS, n_out]
    fmt: str = codec.JSON

    @property
    def headers(self) -> Any:
        return [(codec.CONTENT_TYPE_HEADER, self.fmt.encode())] if self.fmt != codec.JSON else None

    @classmethod
    def build(cls, registry: ModelRegistry, model: str = "demo", fmt: str = codec.JSON) -> Load:
        """JSON requests carry lists of numbers; MessagePack ones raw little-endian bytes.
        A text model's requests carry the demo sentences (`DEMO_TEXTS`)."""
        loaded = registry.resolve(model)
        if loaded.config.text is not None:
            return cls._texts(loaded, fmt)
        if loaded.config.image is not None:
            return cls._images(loaded, fmt)
        rng = np.random.default_rng(7)
        columns = [
            random_input(rng, spec, loaded.config.arch_config) for spec in loaded.config.inputs
        ]
        expected = loaded.run(columns)[0].reshape(VARIANTS, -1)
        binary = fmt == codec.MSGPACK
        payloads = []
        for i in range(VARIANTS):
            tensors = [
                codec.Tensor(
                    name=spec.name,
                    datatype=spec.datatype,  # type: ignore[arg-type]
                    shape=list(spec.shape),
                    data=column[i].astype(column.dtype.newbyteorder("<")).tobytes()
                    if binary
                    else column[i].reshape(-1).tolist(),
                )
                for spec, column in zip(loaded.config.inputs, columns, strict=True)
            ]
            body = {"model": model, "version": loaded.version, "inputs": tensors}
            # JSON: the encoded body without its opening brace; the id goes first.
            payloads.append(body if binary else codec.encode(body)[1:])
        return cls(model, loaded.version, payloads, expected, fmt)

    @classmethod
    def _texts(cls, loaded: LoadedModel, fmt: str) -> Load:
        assert loaded.config.text is not None
        texts = [demo_text(i) for i in range(VARIANTS)]
        expected = loaded.run([texts])[0].reshape(VARIANTS, -1)
        payloads = []
        for text in texts:
            tensor = codec.Tensor(loaded.config.text.input, "BYTES", [1], [text])
            body = {"model": loaded.name, "version": loaded.version, "inputs": [tensor]}
            payloads.append(body if fmt == codec.MSGPACK else codec.encode(body)[1:])
        return cls(loaded.name, loaded.version, payloads, expected, fmt)

    @classmethod
    def _images(cls, loaded: LoadedModel, fmt: str) -> Load:
        """JPEGs of the model's size from the seeded set (`benchmarks.images`): raw bytes in
        MessagePack, base64 in JSON."""
        from benchmarks.images import make_jpegs

        assert loaded.config.image is not None
        images = make_jpegs(VARIANTS, size=loaded.config.image.size[0])
        expected = loaded.run([images])[0].reshape(VARIANTS, -1)
        payloads = []
        for image in images:
            data: Any = image if fmt == codec.MSGPACK else base64.b64encode(image).decode()
            tensor = codec.Tensor(loaded.config.image.input, "BYTES", [1], data)
            body = {"model": loaded.name, "version": loaded.version, "inputs": [tensor]}
            payloads.append(body if fmt == codec.MSGPACK else codec.encode(body)[1:])
        return cls(loaded.name, loaded.version, payloads, expected, fmt)

    def request(self, seq: int, prefix: str) -> tuple[bytes, bytes]:
        request_id = f"{prefix}{seq}".encode()
        payload = self.payloads[seq % VARIANTS]
        if self.fmt == codec.MSGPACK:
            return request_id, codec.encode({"id": request_id.decode(), **payload}, codec.MSGPACK)
        return request_id, b'{"id":"' + request_id + b'",' + payload


def demo_text(i: int) -> str:
    """Text request ``i``: a demo sentence, said ``SLUICE_BENCH_TEXT_REPEAT`` times (1: about
    12 tokens; 8: about 100, a paragraph)."""
    repeat = int(os.environ.get("SLUICE_BENCH_TEXT_REPEAT", "1"))
    return " ".join([DEMO_TEXTS[i % len(DEMO_TEXTS)][1]] * repeat)


def random_input(
    rng: np.random.Generator, spec: Any, arch_config: dict[str, Any], n: int = VARIANTS
) -> np.ndarray:
    """``n`` random examples for one input: normal floats, token ids below the model's
    vocabulary, or full-range bytes."""
    dtype = np.dtype(codec.DTYPES[spec.datatype])
    shape = (n, *spec.shape)
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype == np.uint8:
        return rng.integers(0, 256, shape).astype(dtype)
    return rng.integers(0, int(arch_config.get("vocab_size", 100)), shape).astype(dtype)


@dataclass
class Tally:
    """What the response reader has seen, indexed by request sequence number."""

    n: int
    recv_s: np.ndarray = field(init=False)
    outcomes: dict[str, int] = field(default_factory=dict)
    wrong: int = 0
    duplicates: int = 0
    batch_sizes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.recv_s = np.full(self.n, np.nan)
        # Outputs go into one preallocated array: 100k small lists would make the garbage
        # collector's full passes long enough to show up as latency.
        self.got: np.ndarray | None = None
        self.has_output = np.zeros(self.n, dtype=bool)

    def record_output(self, seq: int, data: list[float] | np.ndarray) -> None:
        if self.got is None:
            self.got = np.zeros((self.n, len(data)), dtype=np.float32)
        self.got[seq] = data
        self.has_output[seq] = True

    def check(self, expected: np.ndarray, rtol: float = 1e-4, atol: float = 1e-5) -> None:
        """Count answered outputs that differ from the model's direct outputs."""
        if self.got is None:
            return
        rows = np.flatnonzero(self.has_output)
        want = expected[rows % VARIANTS]
        close = np.isclose(self.got[rows], want, rtol=rtol, atol=atol).all(axis=1)
        self.wrong = int((~close).sum())

    def by_variant(self, variants: int) -> list[np.ndarray]:
        """Each variant's output as first answered (NaN where no request of it was)."""
        out = []
        for v in range(variants):
            rows = np.flatnonzero(self.has_output[v::variants])
            if self.got is None or not len(rows):
                out.append(np.full(self.got.shape[1] if self.got is not None else 1, np.nan))
            else:
                out.append(self.got[v + variants * rows[0]].copy())
        return out

    @property
    def answered(self) -> int:
        return int(np.count_nonzero(~np.isnan(self.recv_s)))


def relay(settings: Settings, guarded: bool = False) -> None:
    """Consume requests and produce them unchanged to the response topic, keyed the same.

    ``guarded``: besides, what any pipeline that validates requests and never loses one
    must do for each, as sluice does it, and nothing more: the request decoded and
    validated (`codec.decode_request`), its record produced with a delivery report, and
    the consumed batch's offsets stored only once all its records are delivered
    (`OffsetTracker`). No model, no batching, no answer to encode: its maximum bounds what
    sluice could reach with all of its own work gone."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    # As the batch engine's consumer: offsets stored by the tracker, committed by librdkafka.
    store = {"enable.auto.offset.store": False, "auto.commit.interval.ms": 1000} if guarded else {}
    consumer = Consumer(consumer_config(settings, settings.group_id("relay"), **store))
    producer = Producer(producer_config(settings))
    consumer.subscribe([settings.requests_topic])
    tracker = OffsetTracker(consumer)
    topic, limit = settings.responses_topic, settings.max_payload_bytes

    def delivered(batch: ConsumedBatch, err: Any, _msg: Any) -> None:
        batch.outstanding -= 1
        if err is not None:
            raise RuntimeError(f"delivery failed: {err}")  # not in a benchmark run

    try:
        while not stop.is_set():
            if not guarded:
                for m in consume_batch(consumer, 1000, 0.05):
                    if m.error() is None:
                        produce(producer, topic, m.value(), m.key())
                producer.poll(0)
                continue
            messages = [m for m in consume_batch(consumer, 1000, 0.05) if m.error() is None]
            if messages:
                batch = tracker.open({(m.topic(), m.partition()): m.offset() for m in messages})
                report = functools.partial(delivered, batch)
                for m in messages:
                    value = m.value()
                    codec.decode_request(value, limit)
                    batch.outstanding += 1
                    produce(producer, topic, value, m.key(), on_delivery=report)
            producer.poll(0)
            tracker.settle()
    finally:
        producer.flush(10)
        if guarded:
            tracker.settle()
        consumer.close()


def run(
    settings: Settings,
    mode: str,
    requests: int,
    rate: float | None = None,
    progress: bool = True,
    log_dir: Path | None = None,
    timeout_s: float = 120.0,
    payload: str = "json",
    workers: int = 1,
    model: str = "demo",
    tolerance: tuple[float, float] = (1e-4, 1e-5),
    partitions: int | None = None,
    answers: list[np.ndarray] | None = None,
    spawn: Callable[[Settings, Path], list[Any]] | None = None,
    generators: int | None = None,
) -> dict[str, Any]:
    """Start the pipeline in ``mode`` on fresh topics, drive ``requests`` through it, stop it.

    ``payload`` is ``json`` (lists of numbers) or ``msgpack`` (raw little-endian tensors);
    answers must match ``model``'s direct outputs within ``tolerance`` (rtol, atol). The
    topics get ``partitions`` each, by default one per worker process: on a machine that
    also runs the broker, every partition more costs the broker CPU on each fetch and
    produce (measured in benchmarks/README.md). The topics are deleted afterwards. When
    ``answers`` is a list, each request variant's first output as answered through Kafka is
    appended to it (NaN where none was answered). ``spawn`` starts the processes that serve
    the run instead of ``mode``'s (a peer, say), given the run's settings and log folder.
    ``generators`` load-generator processes share the schedule (`benchmarks.loadgen`; by
    default one per two workers, within the host's cores).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if requests < 1:
        raise ValueError(f"requests must be an integer >= 1, got {requests}")
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate}")
    if partitions is not None and partitions < 1:
        raise ValueError(f"partitions must be an integer >= 1, got {partitions}")
    if generators is not None and generators < 1:
        raise ValueError(f"generators must be an integer >= 1, got {generators}")
    run_id = uuid.uuid4().hex[:8]
    settings = settings.replace(
        topic_prefix=f"{settings.topic_prefix}-bench-{mode}-{run_id}",
        partitions=partitions or workers,
    )
    registry = ModelRegistry(settings.models_path)
    if payload not in PAYLOADS:
        raise ValueError(f"payload must be one of {list(PAYLOADS)}, got {payload!r}")
    load = Load.build(registry, model, fmt=PAYLOADS[payload])
    topics = pipeline_topics(settings, registry.names)
    ensure_topics(settings, topics)
    log_dir = log_dir or Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    try:
        summary, tally = _drive(settings, mode, requests, rate, progress, log_dir, timeout_s,
                                workers, load, tolerance, spawn,
                                generators or loadgen.auto_count(workers))  # fmt: skip
        if answers is not None:
            answers.extend(tally.by_variant(len(load.payloads)))
    finally:
        # A broker that keeps every run's topics spends more on each of them over time.
        delete_topics(settings, topics)
    return summary


def _drive(
    settings: Settings,
    mode: str,
    requests: int,
    rate: float | None,
    progress: bool,
    log_dir: Path,
    timeout_s: float,
    workers: int,
    load: Load,
    tolerance: tuple[float, float],
    spawn: Callable[[Settings, Path], list[Any]] | None = None,
    generators: int = 1,
) -> tuple[dict[str, Any], Tally]:
    if spawn is not None:
        processes = spawn(settings, log_dir)
    else:
        processes = procs.spawn_workers(settings, mode, log_dir, count=workers)
    try:
        reader = _Reader(settings, requests, load, check="relay" not in mode)
        # One producer for probes and load: its connection and idempotent-producer id are
        # set up by the probes, outside the measured run.
        producer = Producer(producer_config(settings, **{"linger.ms": 2}))
        try:
            _wait_ready(settings, producer, load, reader, processes, log_dir)
            if workers > 1 and mode != "split":
                _wait_members(settings, settings.group_id(mode), workers)
            # The load generator's own collector pauses would be counted as the pipeline's
            # latency; the measured loops create no reference cycles.
            gc.collect()
            gc.disable()
            cpu_before = _cpu_s(processes)
            if generators > 1:
                sent_s = loadgen.produce_parallel(
                    settings, dataclasses.replace(load, expected=load.expected[:0]), requests,
                    rate, generators, timeout_s,
                    lambda sent: _progress(requests, sent, reader.tally.answered) if progress
                    else None,
                )  # fmt: skip
            else:
                sent_s = _produce(
                    settings, producer, load, requests, rate, reader, progress, timeout_s
                )
            reader.wait(timeout_s, progress, processes)
            cpu_s = _cpu_s(processes) - cpu_before
        finally:
            gc.enable()
            reader.close()
    finally:
        procs.stop(processes)
    reader.tally_outputs()
    reader.tally.check(load.expected, *tolerance)
    summary = _summary(mode, requests, rate, sent_s, reader.tally, load.fmt, workers)
    summary["generators"] = generators
    # The serving processes' CPU (every thread: Python's and librdkafka's) per answer.
    answered = summary["answered"]
    summary["worker_cpu_us_per_request"] = round(cpu_s / answered * 1e6, 2) if answered else None
    return summary, reader.tally


class _Reader:
    """Reads the response topic on a thread and tallies responses by sequence number."""

    def __init__(self, settings: Settings, n: int, load: Load, check: bool) -> None:
        self.tally = Tally(n)
        self.load = load
        self.check = check
        self.prefix = b"r"
        self.probe_seen = threading.Event()
        self._values: list[tuple[int, bytes]] = []
        self._stop = threading.Event()
        self._consumer = topic_reader(
            settings,
            settings.responses_topic,
            f"sluice-bench-reader-{uuid.uuid4().hex[:8]}",
            "read_committed",
        )
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        tally, n = self.tally, self.tally.n
        while not self._stop.is_set():
            messages = consume_batch(self._consumer, 2000, 0.05)
            now = time.perf_counter()
            for m in messages:
                key = m.key() or b""
                if m.error() is not None or not key.startswith(self.prefix):
                    if key.startswith(b"probe"):
                        self.probe_seen.set()
                    continue
                seq = int(key[1:])
                if seq >= n:
                    continue
                if not np.isnan(tally.recv_s[seq]):
                    tally.duplicates += 1
                    continue
                tally.recv_s[seq] = now
                # Decoded after the run: decoding here would hold the GIL that the load
                # generator's producer thread, in the same process, needs to keep time.
                self._values.append((seq, m.value()))

    def tally_outputs(self) -> None:
        """Decode and tally every response received (once, after the run)."""
        values, self._values = self._values, []
        for seq, value in values:
            self._record(seq, value)

    def _record(self, seq: int, value: bytes) -> None:
        tally = self.tally
        if not self.check:
            tally.outcomes["relayed"] = tally.outcomes.get("relayed", 0) + 1
            return
        response = codec.decode_response(value, self.load.fmt)
        tally.outcomes[response.status] = tally.outcomes.get(response.status, 0) + 1
        if response.status != "ok" or not response.outputs:
            return
        # Checked all at once at the end (see `Tally.check`): this thread must keep up.
        data = response.outputs[0].data
        tally.record_output(seq, data if isinstance(data, list) else codec.tensor_values(
            response.outputs[0]).reshape(-1))  # fmt: skip
        if response.timings is not None:
            tally.batch_sizes.append(response.timings.batch_size)

    def wait(self, timeout_s: float, progress: bool, workers: list[Any]) -> None:
        last, last_change = -1, time.monotonic()
        while all(w.poll() is None for w in workers):
            answered = self.tally.answered
            if progress:
                _progress(self.tally.n, self.tally.n, answered)
            if answered >= self.tally.n:
                break
            if answered != last:
                last, last_change = answered, time.monotonic()
            elif time.monotonic() - last_change > timeout_s:
                break
            time.sleep(0.1)
        if progress:
            sys.stderr.write("\n")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._consumer.close()


def _cpu_s(processes: list[Any]) -> float:
    """User and system CPU seconds the processes have used so far (from ``/proc``)."""
    total = 0.0
    for p in processes:
        try:
            fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, AttributeError):
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _wait_ready(
    settings: Settings,
    producer: Producer,
    load: Load,
    reader: _Reader,
    workers: list[Any],
    log_dir: Path,
) -> None:
    """Send probe requests until one is answered: the pipeline is assigned and serving."""
    deadline = time.monotonic() + 90
    i = 0
    while not reader.probe_seen.is_set():
        if time.monotonic() > deadline or any(w.poll() is not None for w in workers):
            logs = "\n".join(p.read_text()[-3000:] for p in log_dir.rglob("*.log"))
            raise RuntimeError(f"pipeline did not become ready; worker logs:\n{logs}")
        key, value = load.request(i, "probe")
        producer.produce(settings.requests_topic, value, key, headers=load.headers)
        producer.flush(5)
        i += 1
        reader.probe_seen.wait(1.0)


def _wait_members(settings: Settings, group: str, n: int, timeout_s: float = 60.0) -> None:
    """Wait until ``n`` consumers share the group, so no rebalance falls inside the run."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient(confluent_config(settings))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        description = admin.describe_consumer_groups([group])[group].result(timeout=10)
        if len(description.members) >= n and str(description.state).endswith("STABLE"):
            return
        time.sleep(0.5)
    raise RuntimeError(f"consumer group {group} did not reach {n} members")


def _produce(
    settings: Settings,
    producer: Producer,
    load: Load,
    n: int,
    rate: float | None,
    reader: _Reader,
    progress: bool,
    timeout_s: float,
) -> np.ndarray:
    """Open loop from this process (`loadgen.send`): request i is due at start + i/rate."""
    sent = np.zeros(n)
    next_report = time.perf_counter()

    def tick(i: int) -> None:
        nonlocal next_report
        if progress and time.perf_counter() >= next_report:
            _progress(n, i + 1, reader.tally.answered)
            next_report = time.perf_counter() + 0.25

    start = time.perf_counter()
    loadgen.send(producer, settings.requests_topic, load, range(n), start, rate, sent, tick)
    producer.flush(timeout_s)
    return sent


def _progress(n: int, sent: int, answered: int) -> None:
    width = 30
    filled = int(width * answered / n) if n else width
    sys.stderr.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] sent {sent}/{n} answered {answered}/{n}"
    )
    sys.stderr.flush()


def _summary(
    mode: str,
    n: int,
    rate: float | None,
    sent_s: np.ndarray,
    tally: Tally,
    fmt: str,
    workers: int = 1,
) -> dict[str, Any]:
    answered_mask = ~np.isnan(tally.recv_s)
    latency_ms = (tally.recv_s[answered_mask] - sent_s[answered_mask]) * 1000.0
    window = (float(sent_s.min()), float(np.nanmax(tally.recv_s)) if answered_mask.any() else 0.0)
    if answered_mask.any():
        span_s = window[1] - window[0]
        throughput = float(answered_mask.sum() / span_s) if span_s > 0 else 0.0
        pct: dict[str, float | None] = {
            f"p{q}": round(float(np.percentile(latency_ms, q)), 3) for q in (50, 95, 99)
        }
        pct["max"] = round(float(latency_ms.max()), 3)
    else:
        throughput, pct = 0.0, {"p50": None, "p95": None, "p99": None, "max": None}
    return {
        "mode": mode,
        "payload": "msgpack" if fmt == codec.MSGPACK else "json",
        "workers": workers,
        "sent": n,
        "answered": int(answered_mask.sum()),
        "outcomes": dict(sorted(tally.outcomes.items())),
        "wrong_outputs": tally.wrong,
        "duplicates": tally.duplicates,
        "offered_rps": rate,
        # How fast the load generator got the requests out (all of them, open loop or not).
        "sent_rps": round(n / float(sent_s.max() - sent_s.min()), 1) if n > 1 else None,
        "throughput_rps": round(throughput, 1),
        "latency_ms": pct,
        "mean_batch_size": round(float(np.mean(tally.batch_sizes)), 2)
        if tally.batch_sizes
        else None,
        # perf_counter seconds of the first send and the last answer, for samplers beside it.
        "window_perf_s": window,
    }


def counts_up_to(most: int) -> list[int]:
    """N = 1, 2, 4, 8 up to ``most``, and ``most`` itself: the points of a scaling run."""
    return sorted({n for n in (1, 2, 4, 8) if n <= most} | {most})


def scaling(
    settings: Settings,
    mode: str,
    most: int,
    requests: int,
    payload: str = "json",
    progress: bool = True,
    generators: int | None = None,
) -> dict[str, Any]:
    """``mode`` through N = 1, 2, 4, 8 … ``most`` worker processes in one group, one
    partition each, in one run: each N's maximum, the p50 and p99 at 75 % of it, and its
    ``scaling_efficiency`` (its maximum over N times one worker's). Then the bare relay with
    ``most`` processes: the ceiling that the broker, the generators and the cores allow."""
    runs: list[dict[str, Any]] = []
    one = 0.0
    for count in counts_up_to(most):
        common: dict[str, Any] = dict(
            payload=payload, workers=count, progress=progress, generators=generators
        )
        top = run(settings, mode, requests * count, None, **common)
        rps = top["throughput_rps"]
        at = run(settings, mode, requests * count, 0.75 * rps, **common) if rps else top
        one = one or rps
        runs.append({
            "workers": count,
            "generators": top["generators"],
            "throughput_rps": rps,
            "sent_rps": top["sent_rps"],
            "scaling_efficiency": round(rps / (count * one), 3) if one else None,
            "rate_for_p99": round(0.75 * rps, 1),
            "p50_ms": at["latency_ms"]["p50"],
            "p99_ms": at["latency_ms"]["p99"],
            "mean_batch_size": top["mean_batch_size"],
            "sent": top["sent"] + at["sent"],
            "answered": top["answered"] + at["answered"],
            "wrong_outputs": top["wrong_outputs"] + at["wrong_outputs"],
        })  # fmt: skip
    relay = run(settings, "relay", requests * most, None, payload=payload, workers=most,
                progress=progress, generators=generators)  # fmt: skip
    return {
        "scenario": "scaling",
        "mode": mode,
        "payload": payload,
        "cores": os.cpu_count(),
        "requests_per_worker": requests,
        "runs": runs,
        "relay": {
            "workers": most,
            "generators": relay["generators"],
            "throughput_rps": relay["throughput_rps"],
            "sent_rps": relay["sent_rps"],
        },
    }


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, separators=(",", ":"))
