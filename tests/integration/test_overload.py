"""Ten times the worker's capacity, for a bounded time: memory stays bounded, lag rises and
then drains, and every request ends as ``ok`` or ``expired`` (none lost).

The fused worker serves tiny requests at tens of thousands per second here, more than a
Python producer on the same two cores can offer ten times over. So requests are made heavy
instead of fast: a model that costs a few milliseconds per row (a TorchScript module that
multiplies by a 1024x1024 matrix several times), served one request per batch
(``max_batch_size=1``). Every request carries ``ttl_ms=2000``, so what the worker cannot
serve in time comes back ``expired`` without being computed.

The issue asks for 60 s of overload; CI runs 20 s. Run the long one by hand with
``SLUICE_OVERLOAD_S=60 pytest tests/integration/test_overload.py``.

Bounds: on the 2-core machine that also runs the broker, the worker's RSS was 778 MiB at
the start of the overload (torch alone is ~720 MiB) and peaked at 782-789 MiB over 20 s
runs. `RSS_BOUND_MIB` is 1.5x that peak; `RSS_GROWTH_BOUND_MIB` bounds the growth during the
overload (measured 4-11 MiB) with room for librdkafka's prefetch queue (16 MiB, set by the
engine) and the producer's buffers: work must wait in Kafka, not in the worker.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline import codec
from pipeline.client import Client
from pipeline.kafka import consumer_config, ensure_topics, pipeline_topics, producer_config
from pipeline.models import DEMO_LABELS, ModelConfig, ModelRegistry, TensorSpec, save_model
from tests.integration.conftest import demo_request, make_settings
from tests.integration.topic_reader import TopicReader

OVERLOAD_S = float(os.environ.get("SLUICE_OVERLOAD_S", "20"))
TTL_MS = 2000
FACTOR = 10.0
CAPACITY_PROBE = 600
MAX_RATE = 8000.0  # what the producer thread reliably offers beside the broker and worker
RSS_BOUND_MIB = 1200
RSS_GROWTH_BOUND_MIB = 64
VARIANTS = 8
WIDTH = 1024
ROUNDS = 12


class Heavy(torch.nn.Module):
    """A few milliseconds of matrix products per row, with only ~4 MiB of weights."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w_in = torch.nn.Parameter(torch.randn(16, WIDTH, generator=g) / 4, False)
        self.w = torch.nn.Parameter(torch.randn(WIDTH, WIDTH, generator=g) / 32, False)
        self.w_out = torch.nn.Parameter(torch.randn(WIDTH, 4, generator=g) / 32, False)
        self.rounds = ROUNDS

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = features @ self.w_in
        for _ in range(self.rounds):
            h = torch.tanh(h @ self.w)
        return h @ self.w_out


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for pid {pid}")


class Monitor:
    """Samples the fused group's lag (high watermark minus committed offset) and worker RSS."""

    def __init__(self, settings, pids: list[int]) -> None:  # type: ignore[no-untyped-def]
        self.settings = settings
        self.pids = pids
        topic = settings.requests_topic
        # The worker's group id, only to read its committed offsets: this consumer never
        # subscribes, so it never joins the group.
        self._consumer = Consumer(
            consumer_config(settings, settings.group_id("fused"), **{"enable.auto.commit": False})
        )
        partitions = self._consumer.list_topics(topic, timeout=15).topics[topic].partitions
        self._partitions = [TopicPartition(topic, p) for p in partitions]
        self.samples: list[tuple[float, int, float]] = []  # (time, lag, rss)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="overload-monitor")

    def lag(self) -> int:
        committed = self._consumer.committed(self._partitions, timeout=10)
        total = 0
        for tp in committed:
            _, high = self._consumer.get_watermark_offsets(tp, timeout=10)
            total += high - max(tp.offset, 0)
        return total

    def rss(self) -> float:
        return sum(_rss_mib(pid) for pid in self.pids)

    def sample(self) -> tuple[float, int, float]:
        s = (time.monotonic(), self.lag(), self.rss())
        self.samples.append(s)
        return s

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.sample()

    def __enter__(self) -> Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self._consumer.close()


# torch 2.10+ deprecates torch.jit with a FutureWarning; the torchscript format still works.
@pytest.mark.filterwarnings(r"ignore:`torch\.jit\.\w+` is deprecated:FutureWarning")
def test_overload_ten_times_capacity(bootstrap: str, tmp_path: Path, start_workers) -> None:
    model_dir = tmp_path / "models"
    config = ModelConfig(
        format="torchscript",
        inputs=(TensorSpec("features", "FP32", (16,)),),
        outputs=(TensorSpec("logits", "FP32", (4,)),),
        labels=DEMO_LABELS,
    )
    # Named "demo", so that the readiness probes of `Workers.wait_ready` fit it.
    save_model(model_dir, "demo", "1", Heavy(), config)
    rng = np.random.default_rng(3)
    inputs = rng.standard_normal((VARIANTS, 16)).astype(np.float32)
    torch.set_num_threads(1)
    expected = ModelRegistry(model_dir).resolve("demo").run([inputs])[0]
    settings = make_settings(bootstrap, model_dir, max_batch_size=1, max_delay_s=0.0)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))

    with Client(settings) as client:
        workers = start_workers(settings, "fused")
        workers.wait_ready(client)
        # Capacity: a burst served as fast as the worker can, timed over its second half
        # (the first includes the worker's first fetches).
        done: list[float] = []
        burst = []
        for i in range(CAPACITY_PROBE):
            future = client.submit(demo_request(f"c-{i}", inputs[i % VARIANTS].tolist()))
            future.add_done_callback(lambda _: done.append(time.monotonic()))
            burst.append(future)
        client.flush()
        assert {f.result(timeout=120).status for f in burst} == {"ok"}
        done.sort()
        half = CAPACITY_PROBE // 2
        capacity = (CAPACITY_PROBE - half) / (done[-1] - done[half - 1])
    rate = min(FACTOR * capacity, MAX_RATE)
    n = int(rate * OVERLOAD_S)

    bodies = [
        codec.encode(demo_request("", row.tolist(), ttl_ms=TTL_MS))[len(b'{"id":""') :]
        for row in inputs
    ]
    producer = Producer(producer_config(settings, **{"linger.ms": 5}))
    pids = [p.pid for p in workers.procs]
    with Monitor(settings, pids) as monitor:
        _, lag0, rss0 = monitor.sample()
        start = time.monotonic()
        for i in range(n):
            if i % 64 == 0:
                delay = start + i / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
            value = b'{"id":"o-%d"' % i + bodies[i % VARIANTS]
            while True:
                try:
                    producer.produce(settings.requests_topic, value, b"o-%d" % i)
                    break
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0)
        assert producer.flush(60) == 0
        offered_s = time.monotonic() - start
        # Drained: the group has committed everything that was produced.
        drain_deadline = time.monotonic() + 120
        while monitor.lag() > 0 and time.monotonic() < drain_deadline:
            time.sleep(0.5)
        drained_s = time.monotonic() - start - offered_s
        final_lag = monitor.lag()

    assert workers.alive(), f"worker exited:\n{workers.logs()}"
    statuses: dict[str, list[str]] = {}
    wrong = 0
    with TopicReader(settings, settings.responses_topic) as reader:

        def on_response(read) -> None:  # type: ignore[no-untyped-def]
            nonlocal wrong
            response = codec.decode_response(read.value)
            if not response.id.startswith("o-"):
                return
            statuses.setdefault(response.id, []).append(response.status)
            if response.status == "ok":
                assert response.outputs is not None
                got = codec.tensor_values(response.outputs[0])
                want = expected[int(response.id[2:]) % VARIANTS]
                wrong += not np.allclose(got, want, rtol=1e-4, atol=1e-5)

        reader.read_until(lambda: len(statuses) >= n, 120, on_response)
    outcomes = Counter(s for ss in statuses.values() for s in ss)
    lost = n - len(statuses)
    duplicates = sum(len(ss) - 1 for ss in statuses.values())
    max_lag = max(lag for _, lag, _ in monitor.samples)
    max_rss = max(rss for _, _, rss in monitor.samples)
    served = outcomes["ok"] / offered_s
    print(
        f"capacity {capacity:.0f} req/s, offered {n / offered_s:.0f} req/s "
        f"({n} in {offered_s:.1f}s), served {served:.0f} req/s ok, "
        f"outcomes {dict(outcomes)}, lost {lost}, duplicates {duplicates}, "
        f"lag {lag0} -> max {max_lag} -> {final_lag} "
        f"(drained {drained_s:.1f}s after the load), RSS {rss0:.0f} -> max {max_rss:.0f} MiB"
    )
    assert n / offered_s >= 0.8 * rate, "the producer could not offer the planned load"
    assert rate >= 5 * capacity
    assert lost == 0, f"{lost} requests never answered"
    assert duplicates == 0
    assert set(outcomes) == {"ok", "expired"}, outcomes
    assert wrong == 0
    assert max_lag >= 2 * capacity, "lag never rose: the worker was not overloaded"
    assert final_lag == 0, f"lag did not drain: {final_lag}"
    assert max_rss < RSS_BOUND_MIB, f"worker RSS {max_rss:.0f} MiB"
    assert max_rss - rss0 < RSS_GROWTH_BOUND_MIB, f"worker RSS grew {max_rss - rss0:.0f} MiB"
