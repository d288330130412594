"""Memory and flow under load: ten times capacity for a while, half capacity for long."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from pathlib import Path
from typing import Any

import numpy as np
import torch
from confluent_kafka import Producer

from benchmarks import bench
from benchmarks.chaos.common import (
    RssSampler,
    answers,
    no_jit_deprecation,
    prepare,
    running,
    slope_per_min,
    summary,
    topic_count,
)
from benchmarks.harness import TopicReader, Workers, demo_request
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.kafka import consume_batch, producer_config, topic_reader
from pipeline.kafka import lag as lag_mod
from pipeline.kafka.produce import produce
from pipeline.models import DEMO_LABELS, ModelConfig, ModelRegistry, TensorSpec, save_model
from pipeline.protocol import codec

# -- overload -------------------------------------------------------------------------------

# Bounds for the overloaded worker. On the 2-core machine that also runs the broker, its RSS
# was 778 MiB at the start of the overload (torch alone is ~720 MiB) and peaked at 782-789
# MiB over 20 s runs: the bound is 1.5x that peak. The growth bound (measured 4-11 MiB)
# leaves room for librdkafka's prefetch queue (16 MiB, set by the engine) and the
# producer's buffers: work must wait in Kafka, not in the worker.
OVERLOAD_RSS_BOUND_MB = 1200.0
OVERLOAD_RSS_GROWTH_BOUND_MB = 64.0
OVERLOAD_TTL_MS = 2000
_HEAVY_WIDTH = 1024
_HEAVY_ROUNDS = 12
_VARIANTS = 8


class Heavy(torch.nn.Module):
    """A few milliseconds of matrix products per row, with only ~4 MiB of weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in = torch.nn.Parameter(torch.randn(16, _HEAVY_WIDTH, generator=g) / 4, False)
        w = torch.randn(_HEAVY_WIDTH, _HEAVY_WIDTH, generator=g) / 32
        self.w = torch.nn.Parameter(w, False)
        self.w_out = torch.nn.Parameter(torch.randn(_HEAVY_WIDTH, 4, generator=g) / 32, False)
        self.rounds = _HEAVY_ROUNDS

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = features @ self.w_in
        for _ in range(self.rounds):
            h = torch.tanh(h @ self.w)
        return h @ self.w_out


class _LagMonitor:
    """The fused group's offset lag on the requests topic, sampled every 0.5 s."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._admin = lag_mod.admin_client(settings)
        self.samples: deque[int] = deque(maxlen=100_000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lag-monitor", daemon=True)

    def lag(self) -> int:
        s = self._settings
        rows = lag_mod.describe(
            s, [s.group_id("fused")], [s.requests_topic], admin=self._admin, time_lag=False
        )
        total = sum(r.lag for r in rows)
        self.samples.append(total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.lag()

    def __enter__(self) -> _LagMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def overload(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    factor: float = 10.0,
    capacity_probe: int = 600,
    max_rate: float = 8000.0,
) -> dict[str, Any]:
    """``factor`` times the worker's measured capacity for ``duration_s`` (default 60):
    memory stays bounded, lag rises and then drains, every request ends ``ok`` or
    ``expired``.

    The fused worker serves tiny requests at tens of thousands per second, more than a
    Python producer on the same cores can offer ten times over. So requests are made heavy
    instead of fast: a model that costs a few milliseconds per row (`Heavy`), served one
    request per batch. Each request carries a TTL, so what the worker cannot serve in time
    comes back ``expired`` without being computed. ``max_rate`` is what one producer thread
    reliably offers beside the broker and worker; ``requests`` is ignored.
    """
    duration_s = duration_s or 60.0
    model_dir = work / "overload-models"
    config = ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("features", "FP32", (16,)),),
        outputs=(TensorSpec("logits", "FP32", (4,)),),
        labels=DEMO_LABELS,
    )
    torch.set_num_threads(1)
    with no_jit_deprecation():
        # Named "demo", so that the readiness probes fit it.
        save_model(model_dir, "demo", "1", Heavy(), config)
        inputs = np.random.default_rng(3).standard_normal((_VARIANTS, 16)).astype(np.float32)
        expected = ModelRegistry(model_dir).resolve("demo").run([inputs])[0]
    settings = prepare(
        settings.replace(model_dir=model_dir), "overload", work, max_batch_size=1, max_delay_s=0.0
    )
    workers = Workers(settings, "fused", work / "logs" / "w0")
    with running(workers.start()):
        with Client(settings) as client:
            workers.wait_ready(client)
            # Capacity: a burst served as fast as the worker can, timed over its second half
            # (the first includes the worker's first fetches).
            done: list[float] = []
            burst = []
            for i in range(capacity_probe):
                future = client.submit(demo_request(f"c-{i}", inputs[i % _VARIANTS].tolist()))
                future.add_done_callback(lambda _: done.append(time.monotonic()))
                burst.append(future)
            client.flush()
            burst_ok = [r is not None and r.status == "ok" for r in answers(burst, 120)]
            done.sort()
            half = capacity_probe // 2
            capacity = (capacity_probe - half) / (done[-1] - done[half - 1])
        rate = min(factor * capacity, max_rate)
        n = int(rate * duration_s)

        bodies = [
            codec.encode(demo_request("", row.tolist(), ttl_ms=OVERLOAD_TTL_MS))[len(b'{"id":""') :]
            for row in inputs
        ]
        producer = Producer(producer_config(settings, **{"linger.ms": 5}))
        pids = [p.pid for p in workers.procs]
        with RssSampler(lambda: pids, interval_s=0.5) as rss, _LagMonitor(settings) as monitor:
            rss0, lag0 = rss.samples[0][1], monitor.lag()
            start = time.monotonic()
            for i in range(n):
                if i % 64 == 0:
                    delay = start + i / rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                value = b'{"id":"o-%d"' % i + bodies[i % _VARIANTS]
                produce(producer, settings.requests_topic, value, b"o-%d" % i)
                producer.poll(0)
            undelivered = producer.flush(60)
            offered_s = time.monotonic() - start
            # Drained: the group has committed everything that was produced.
            drain_deadline = time.monotonic() + 120
            while monitor.lag() > 0 and time.monotonic() < drain_deadline:
                time.sleep(0.5)
            drained_s = time.monotonic() - start - offered_s
            final_lag = monitor.lag()
        alive = workers.alive()

    statuses: dict[str, list[str]] = {}
    wrong = 0
    with TopicReader(settings, settings.responses_topic, keep=False) as reader:

        def on_response(read: Any) -> None:
            nonlocal wrong
            response = codec.decode_response(read.value)
            if not response.id.startswith("o-"):
                return
            statuses.setdefault(response.id, []).append(response.status)
            if response.status == "ok" and response.outputs is not None:
                got = codec.tensor_values(response.outputs[0])
                want = expected[int(response.id[2:]) % _VARIANTS]
                wrong += not np.allclose(got, want, rtol=1e-4, atol=1e-5)

        reader.read_until(lambda: len(statuses) >= n, 120, on_response)
    outcomes = Counter(s for ss in statuses.values() for s in ss)
    max_rss = max(mb for _, mb in rss.samples)
    return {
        **summary(
            n,
            len(statuses),
            n - len(statuses),
            sum(len(ss) - 1 for ss in statuses.values()),
            topic_count(settings, settings.dlq_topic),
            0,
            int(not alive),
            rss.max_mb,
        ),
        "capacity_rps": round(capacity, 1),
        "capacity_probe_ok": all(burst_ok),
        "planned_rps": round(rate, 1),
        "offered_rps": round(n / offered_s, 1),
        "offered_s": round(offered_s, 1),
        "undelivered": undelivered,
        "served_ok_rps": round(outcomes["ok"] / offered_s, 1),
        "outcomes": dict(outcomes),
        "wrong_outputs": wrong,
        "lag_start": lag0,
        "max_lag": max(monitor.samples),
        "final_lag": final_lag,
        "drained_s": round(drained_s, 1),
        "rss_start_mb": round(rss0, 1),
        "rss_growth_mb": round(max_rss - rss0, 1),
        "rss_bound_mb": OVERLOAD_RSS_BOUND_MB,
        "rss_growth_bound_mb": OVERLOAD_RSS_GROWTH_BOUND_MB,
        "within_rss_bound": max_rss < OVERLOAD_RSS_BOUND_MB
        and max_rss - rss0 < OVERLOAD_RSS_GROWTH_BOUND_MB,
    }


# -- soak -----------------------------------------------------------------------------------


class _SeqReader:
    """Reads the response topic on a thread, counting answers per sequence number of keys
    ``<prefix><seq>`` in arrays (a soak sends millions: no per-request objects)."""

    def __init__(self, settings: Settings, load: bench.Load, n_burst: int, n_max: int) -> None:
        self.load = load
        self.burst_at = np.full(n_burst, np.nan)
        self.counts = np.zeros(n_max, dtype=np.uint8)
        self.outcomes: Counter[str] = Counter()
        self.wrong = self.checked = 0
        self._stop = threading.Event()
        self._consumer = topic_reader(
            settings,
            settings.responses_topic,
            f"{settings.topic_prefix}-soak-reader",
            "read_committed",
        )
        self._thread = threading.Thread(target=self._loop, name="soak-reader", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            for m in consume_batch(self._consumer, 2000, 0.05):
                key = m.key() or b""
                if m.error() is not None:
                    continue
                seq = int(key[1:]) if key[1:].isdigit() else -1
                if key.startswith(b"c") and 0 <= seq < len(self.burst_at):
                    self.burst_at[seq] = time.monotonic()
                elif key.startswith(b"s") and 0 <= seq < len(self.counts):
                    self.counts[seq] = min(255, int(self.counts[seq]) + 1)
                    if self.counts[seq] > 1:
                        continue
                    response = codec.decode_response(m.value())
                    self.outcomes[response.status] += 1
                    # Outputs checked on a sample: this thread must keep up with the load.
                    if seq % 100 == 0 and response.outputs:
                        self.checked += 1
                        got = codec.tensor_values(response.outputs[0])
                        want = self.load.expected[seq % bench.VARIANTS]
                        self.wrong += not np.allclose(got, want, rtol=1e-4, atol=1e-5)

    def answered(self, n: int) -> int:
        return int(np.count_nonzero(self.counts[:n]))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._consumer.close()


def _send(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    produce(producer, topic, value, key)


def soak(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    burst: int = 20_000,
    sample_every_s: float = 5.0,
    warmup_s: float = 60.0,
) -> dict[str, Any]:
    """Paced load at half the capacity that a ``burst`` measures at the start, for
    ``duration_s`` (default 1200): the worker's RSS must show no growth trend.

    ``rss_slope_mb_per_min`` is a least-squares fit over the RSS samples (every
    ``sample_every_s``, at least 20 in a run) after the warm-up (``warmup_s``, at most a
    third of the run).
    ``requests`` is ignored: the rate and duration set the count.
    """
    duration_s = duration_s or 1200.0
    warmup_s = min(warmup_s, duration_s / 3)
    sample_every_s = min(sample_every_s, duration_s / 20)
    settings = prepare(settings, "soak", work)
    load = bench.Load.build(ModelRegistry(settings.models_path))
    topic = settings.requests_topic
    workers = Workers(settings, "fused", work / "logs" / "w0")
    with running(workers.start()):
        with Client(settings) as client:
            workers.wait_ready(client)
        producer = Producer(producer_config(settings, **{"linger.ms": 2}))
        # The soak's rate is not known before the burst: room for twice the burst's rate.
        reader: _SeqReader | None = None
        try:
            reader = _SeqReader(settings, load, burst, n_max=1)
            start = time.monotonic()
            for seq in range(burst):
                _send(producer, topic, *load.request(seq, "c"))
                if seq % 256 == 0:
                    producer.poll(0)
            producer.flush(60)
            deadline = time.monotonic() + 120
            while np.isnan(reader.burst_at).any() and time.monotonic() < deadline:
                time.sleep(0.1)
            done = np.sort(reader.burst_at[~np.isnan(reader.burst_at)])
            half = burst // 2
            if len(done) < burst:
                raise RuntimeError(f"capacity burst: {len(done)} of {burst} answered")
            capacity = (burst - half) / (done[-1] - done[half - 1])
            burst_s = done[-1] - start
        finally:
            if reader is not None:
                reader.close()
        rate = capacity / 2
        n = int(rate * duration_s)
        reader = _SeqReader(settings, load, 1, n_max=n)
        try:
            with RssSampler(lambda: [p.pid for p in workers.procs], sample_every_s) as rss:
                start = time.monotonic()
                for seq in range(n):
                    due = start + seq / rate
                    ahead = due - time.monotonic()
                    if ahead > 0.0005:
                        time.sleep(ahead)
                    _send(producer, topic, *load.request(seq, "s"))
                    if seq % 256 == 0:
                        producer.poll(0)
                undelivered = producer.flush(60)
                offered_s = time.monotonic() - start
                last, last_change = -1, time.monotonic()
                while reader.answered(n) < n and time.monotonic() - last_change < 60:
                    if reader.answered(n) != last:
                        last, last_change = reader.answered(n), time.monotonic()
                    time.sleep(0.5)
            alive = workers.alive()
        finally:
            reader.close()
    answered = reader.answered(n)
    steady = [(t, mb) for t, mb in rss.samples if t >= warmup_s]
    return {
        **summary(
            n,
            answered,
            n - answered,
            int(reader.counts.sum()) - answered,
            topic_count(settings, settings.dlq_topic),
            0,
            int(not alive),
            rss.max_mb,
        ),
        "capacity_rps": round(float(capacity), 1),
        "capacity_burst": burst,
        "capacity_burst_s": round(float(burst_s), 2),
        "rate_rps": round(rate, 1),
        "offered_rps": round(n / offered_s, 1),
        "offered_s": round(offered_s, 1),
        "undelivered": undelivered,
        "outcomes": dict(reader.outcomes),
        "outputs_checked": reader.checked,
        "wrong_outputs": reader.wrong,
        "rss_samples": len(steady),
        "rss_start_mb": round(steady[0][1], 1),
        "rss_end_mb": round(steady[-1][1], 1),
        "rss_slope_mb_per_min": round(slope_per_min(steady), 3),
        "warmup_s": warmup_s,
    }
