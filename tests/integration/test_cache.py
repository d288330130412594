"""Feature tables, enrichment and the Redis source on the real broker (and a real Redis)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from confluent_kafka import Consumer

from benchmarks.bench_prefetch import feature_request, feature_value, init_feature_model
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.engines.batch import BatchEngine
from pipeline.features.rocksdb import Changelog, PartitionedTables, ensure_changelog
from pipeline.features.sources import open_source
from pipeline.features.sources.files import FileSource
from pipeline.features.sources.redis import RedisSource
from pipeline.kafka import consumer_config, ensure_topics, high_watermark, pipeline_topics
from pipeline.models import ModelRegistry, init_demo
from pipeline.observability.metrics import Metrics
from pipeline.serving import Pipeline
from tests.integration.conftest import make_settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A redis-server of this test's own on a free port, stopped by its PID."""
    port = _free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def feature_models(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    init_demo(models)
    init_feature_model(models)
    return models


# -- the Redis source -----------------------------------------------------------------------


def test_redis_source(redis_url: str) -> None:
    source = open_source(redis_url + "?prefix=feat:")
    assert isinstance(source, RedisSource)
    try:
        source.put_many({f"user-{i}": feature_value(f"user-{i}") for i in range(300)})
        assert source.get("user-7") == feature_value("user-7")
        assert source.get("nobody") is None
        got = source.get_many(["user-1", "nobody", "user-2"])
        assert got == {"user-1": feature_value("user-1"), "user-2": feature_value("user-2")}
        assert sorted(source.keys()) == sorted(f"user-{i}" for i in range(300))
        # The prefix keeps other data in the same database out.
        source.client.set("other", b"x")
        assert "other" not in set(source.keys())
    finally:
        source.close()


@pytest.mark.parametrize("engine", ["batch", "faust"])
def test_enrichment_end_to_end_from_redis(
    engine: str,
    bootstrap: str,
    feature_models: Path,
    redis_url: str,
    tmp_path: Path,
    start_workers,
) -> None:
    """A worker process fills the model's feature input from Redis by the request's key; an
    unknown key is answered with an error (and dead-lettered), not a crash or a hang; the
    data lands in the worker's L2 table, whose changelog then holds it."""
    source = open_source(redis_url)
    source.put_many({f"user-{i}": feature_value(f"user-{i}") for i in range(20)})
    source.close()
    settings = make_settings(
        bootstrap, feature_models, feature_source=redis_url, cache_dir=tmp_path / "cache",
        engine=engine,
    )  # fmt: skip
    ensure_topics(settings, pipeline_topics(settings, ["demo", "recommend"]))
    with Client(settings) as client:
        workers = start_workers(settings, "fused")
        workers.wait_ready(client)
        futures = [client.submit(feature_request(f"f-{i}", f"user-{i % 20}")) for i in range(40)]
        unknown = client.submit(feature_request("f-unknown", "nobody"))
        client.flush()
        responses = [f.result(timeout=60) for f in futures]
        assert {r.status for r in responses} == {"ok"}
        registry = ModelRegistry(feature_models, device=torch.device("cpu"))
        model = registry.resolve("recommend")
        for r in responses[:3]:
            key = f"user-{int(r.id.split('-')[1]) % 20}"
            user = torch.frombuffer(bytearray(feature_value(key)), dtype=torch.float32)
            expected = model.module(torch.full((1, 8), 0.25), user[None])
            expected = expected[0] if isinstance(expected, (tuple, list)) else expected
            assert r.outputs[0].data == pytest.approx(expected[0].tolist(), rel=1e-5, abs=1e-6)
        missing = unknown.result(timeout=60)
        assert missing.status == "error"
        assert missing.error is not None and missing.error.code == "unknown_key"
        assert "nobody" in missing.error.message
        assert workers.alive()
    # Each of the 20 keys went into the table of its partition. The table's changelog
    # records are produced beside the answers, not before them: wait for them a little.
    consumer = Consumer(consumer_config(settings, f"{settings.topic_prefix}-check"))
    changelog = settings.features_changelog_topic
    deadline = time.monotonic() + 15
    try:
        while True:
            written = sum(
                high_watermark(consumer, changelog, p) for p in range(settings.partitions)
            )
            if written >= 20 or time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        consumer.close()
    assert written >= 20


# -- L2 tables: changelog recovery and rebalance -------------------------------------------


def _partition(key: str, partitions: int) -> int:
    """librdkafka's default partitioner for keyed records (consistent_random: CRC32)."""
    return zlib.crc32(key.encode()) % partitions


class InProcessWorker:
    """A fused batch engine in a thread, with its own L2 table directory."""

    def __init__(self, settings: Settings, name: str) -> None:
        self.settings = settings.replace(worker_id=name)
        registry = ModelRegistry(settings.models_path, device=torch.device("cpu"))
        registry.load_all()
        self.pipeline = Pipeline(self.settings, registry, None, Metrics())
        self.engine = BatchEngine(self.settings, "fused", self.pipeline)
        self.thread = threading.Thread(target=self.engine.run, name=f"worker-{name}")
        self.thread.start()

    @property
    def tables(self) -> PartitionedTables:
        assert self.pipeline.features is not None and self.pipeline.features.l2 is not None
        return self.pipeline.features.l2

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(30)
        self.pipeline.close()


@pytest.fixture
def table_settings(bootstrap: str, feature_models: Path, tmp_path: Path) -> Settings:
    source = FileSource(tmp_path / "features")
    source.put_many({f"user-{i}": feature_value(f"user-{i}") for i in range(40)})
    source.close()
    settings = make_settings(
        bootstrap, feature_models, cache_dir=tmp_path / "cache",
        feature_source=f"files://{tmp_path / 'features'}", prefetch_enabled=False,
        session_timeout_ms=6000,
    )  # fmt: skip
    ensure_topics(settings, pipeline_topics(settings, ["demo", "recommend"]))
    return settings


def _ask(client: Client, keys: list[str]) -> dict[str, str]:
    futures = {k: client.submit(feature_request(f"{k}-{uuid.uuid4().hex[:6]}", k)) for k in keys}
    client.flush()
    return {k: f.result(timeout=60).status for k, f in futures.items()}


def test_table_survives_a_restart_through_its_changelog(
    table_settings: Settings, tmp_path: Path
) -> None:
    keys = [f"user-{i}" for i in range(12)]
    with Client(table_settings) as client:
        first = InProcessWorker(table_settings, "a")
        try:
            assert set(_ask(client, keys).values()) == {"ok"}
            assert sorted(first.tables.partitions) == [0, 1]
            for k in keys:
                assert first.tables.get(k, _partition(k, 2)) == feature_value(k)
        finally:
            first.stop()
        # The disk is lost and the cold source forgets the keys: only the changelog has them.
        shutil.rmtree(first.settings.l2_tables_path)
        source = FileSource(tmp_path / "features")
        source.delete_many([*keys, "user-30"])
        source.close()
        second = InProcessWorker(table_settings, "a")
        try:
            statuses = _ask(client, keys + ["user-30"])
            assert statuses.pop("user-30") == "error"  # gone from the source, never in L2
            assert set(statuses.values()) == {"ok"}, statuses
            for k in keys:
                assert second.tables.get(k, _partition(k, 2)) == feature_value(k)
        finally:
            second.stop()


def test_table_partition_follows_a_rebalance(table_settings: Settings) -> None:
    keys = [f"user-{i}" for i in range(16)]
    with Client(table_settings) as client:
        a = InProcessWorker(table_settings, "a")
        b = None
        try:
            assert set(_ask(client, keys).values()) == {"ok"}
            b = InProcessWorker(table_settings, "b")
            deadline = time.monotonic() + 60
            while not (a.tables.partitions and b.tables.partitions):
                assert time.monotonic() < deadline, "no rebalance onto the second worker"
                _ask(client, keys[:2])  # keep the group polling
                time.sleep(0.2)
            [moved] = b.tables.partitions
            assert a.tables.partitions == [1 - moved]
            mine = [k for k in keys if _partition(k, 2) == moved]
            assert mine
            # b restored what a wrote for that partition before b ever served one of its keys.
            for k in mine:
                assert b.tables.get(k, moved) == feature_value(k)
            assert all(b.tables.get(k, moved) is None for k in keys if k not in mine)
        finally:
            a.stop()
            if b is not None:
                b.stop()


def test_a_slow_source_does_not_hold_up_cached_requests(table_settings: Settings) -> None:
    """The batch engine admits a request whose features must come from the source on a
    thread: while that round trip hangs, requests with cached features are answered."""
    worker = InProcessWorker(table_settings, "a")
    assert worker.pipeline.features is not None
    gate, entered = threading.Event(), threading.Event()
    inner = worker.pipeline.features.source
    real_get_many = inner.get_many

    def slow_get_many(keys):  # type: ignore[no-untyped-def]
        keys = list(keys)
        if "user-20" in keys:
            entered.set()
            gate.wait(30)
        return real_get_many(keys)

    inner.get_many = slow_get_many  # type: ignore[method-assign]
    try:
        with Client(table_settings) as client:
            warm = [f"user-{i}" for i in range(4)]
            assert set(_ask(client, warm).values()) == {"ok"}  # now cached
            slow = client.submit(feature_request("slow-1", "user-20"))
            client.flush()
            assert entered.wait(30), "the source was never asked for user-20"
            assert set(_ask(client, warm).values()) == {"ok"}  # answered while it hangs
            assert not slow.done()
            gate.set()
            answer = slow.result(timeout=60)
            assert answer.status == "ok"
            assert answer.outputs
    finally:
        gate.set()
        worker.stop()


def test_changelog_replays_evictions_and_expiry(bootstrap: str, tmp_path: Path) -> None:
    """Restoring from the changelog keeps the byte bound and drops what expired."""
    settings = make_settings(bootstrap, tmp_path, partitions=1)
    topic = settings.features_changelog_topic
    ensure_changelog(settings, topic)
    value = b"v" * 100
    tables = PartitionedTables(tmp_path / "t1", 1200, 0.0, Changelog(settings, topic))
    tables.assign([0])
    for i in range(30):
        tables.put(f"k{i}", value, 0)
    tables.put("short", value, 0, ttl_s=0.3)
    held = {k for k in (f"k{i}" for i in range(30)) if tables.get(k, 0) is not None}
    tables.close()
    time.sleep(0.4)
    restored = PartitionedTables(tmp_path / "t2", 1200, 0.0, Changelog(settings, topic))
    restored.assign([0])
    try:
        assert restored.stats().bytes <= 1200
        assert {k for k in (f"k{i}" for i in range(30)) if restored.get(k, 0)} == held
        assert restored.get("short", 0) is None
    finally:
        restored.close()
