"""Cache tiers (parametrised over every backend), the cold sources, Bloom filter, negative
cache, the tiered read-through and the result cache."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from pipeline.features.base import FeatureSource, Tier, WrappedSource, entry_bytes
from pipeline.features.bloom import BloomFilter, NegativeCache
from pipeline.features.memory import MemoryTier
from pipeline.features.rocksdb import PartitionedTables, RocksDBTier
from pipeline.features.sources import open_source
from pipeline.features.sources.files import FileSource
from pipeline.features.store import FeatureStore
from pipeline.observability.metrics import Metrics
from pipeline.protocol import codec
from pipeline.serving.result_cache import ResultCache

TIERS = ("memory", "rocksdb")


def make_tier(kind: str, tmp_path: Path, max_bytes: int, ttl_s: float = 0.0) -> Tier:
    if kind == "memory":
        return MemoryTier(max_bytes, ttl_s)
    return RocksDBTier(tmp_path / "l2", max_bytes, ttl_s)


@pytest.fixture(params=TIERS)
def tier_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def tier(tier_kind: str, tmp_path: Path) -> Iterator[Tier]:
    t = make_tier(tier_kind, tmp_path, 1 << 20)
    yield t
    t.close()


def test_get_put_delete(tier: Tier) -> None:
    assert tier.get("a") is None
    assert tier.put("a", b"alpha")
    assert tier.put("b", b"beta")
    assert tier.get("a") == b"alpha"
    assert tier.get_many(["a", "b", "c"]) == {"a": b"alpha", "b": b"beta"}
    tier.put("a", b"again")
    assert tier.get("a") == b"again"
    tier.delete("a")
    tier.delete("never")
    assert tier.get("a") is None
    stats = tier.stats()
    assert stats.entries == 1
    assert stats.bytes == entry_bytes("b", b"beta")


def test_ttl_expiry(tier_kind: str, tmp_path: Path) -> None:
    tier = make_tier(tier_kind, tmp_path, 1 << 20, ttl_s=0.2)
    try:
        tier.put("short", b"x", ttl_s=0.05)
        tier.put("default", b"y")
        tier.put("forever", b"z", ttl_s=0)
        assert tier.get("short") == b"x"
        time.sleep(0.1)
        assert tier.get("short") is None
        assert tier.get("default") == b"y"
        time.sleep(0.15)
        assert tier.get("default") is None
        assert tier.get("forever") == b"z"
        assert tier.stats().entries == 1
    finally:
        tier.close()


def test_byte_bound_holds_and_evicts_oldest(tier_kind: str, tmp_path: Path) -> None:
    value = b"v" * 100
    per_entry = entry_bytes("key-000", value)
    tier = make_tier(tier_kind, tmp_path, per_entry * 10)
    try:
        for i in range(50):
            assert tier.put(f"key-{i:03d}", value)
            assert tier.stats().bytes <= per_entry * 10
        assert tier.stats().entries == 10
        assert tier.get("key-000") is None
        assert tier.get("key-049") == value
        # An entry bigger than the whole bound is refused, not stored.
        assert not tier.put("huge", b"h" * per_entry * 11)
        assert tier.get("huge") is None
    finally:
        tier.close()


def test_memory_tier_is_lru() -> None:
    per_entry = entry_bytes("a", b"1")
    tier = MemoryTier(per_entry * 2)
    tier.put("a", b"1")
    tier.put("b", b"2")
    assert tier.get("a") == b"1"  # a is now the most recently used
    tier.put("c", b"3")
    assert tier.get("b") is None
    assert tier.get("a") == b"1"


def test_rocksdb_tier_reopens_with_its_contents(tmp_path: Path) -> None:
    tier = RocksDBTier(tmp_path / "db", 1 << 20)
    tier.put("a", b"alpha")
    tier.put("b", b"beta")
    tier.delete("b")
    tier.close()
    again = RocksDBTier(tmp_path / "db", 1 << 20)
    try:
        assert again.get("a") == b"alpha"
        assert again.get("b") is None
        assert again.stats().bytes == entry_bytes("a", b"alpha")
        again.put("c", b"gamma")  # the write order continues after the reopened one
        assert again.get("c") == b"gamma"
    finally:
        again.close()


@pytest.mark.parametrize("bad", [0, -1, 1.5])
def test_tiers_reject_bad_bounds(bad: object, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=f"max_bytes must be an integer >= 1, got {bad!r}"):
        MemoryTier(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_bytes"):
        RocksDBTier(tmp_path / "bad", bad)  # type: ignore[arg-type]


# -- sources ---------------------------------------------------------------------------------


def test_file_source_round_trip(tmp_path: Path) -> None:
    source = FileSource(tmp_path / "src", shards=4)
    source.put_many({f"k{i}": f"value-{i}".encode() for i in range(100)})
    source.put_many({"k1": b"new"})
    source.delete_many(["k2"])
    assert source.get("k1") == b"new"
    assert source.get("k2") is None
    assert source.get_many(["k3", "missing"]) == {"k3": b"value-3"}
    source.close()
    reopened = open_source(f"files://{tmp_path / 'src'}")
    try:
        assert reopened.get("k1") == b"new"
        assert reopened.get("k2") is None
        assert sorted(reopened.keys()) == sorted(f"k{i}" for i in range(100) if i != 2)
        assert len(list((tmp_path / "src").glob("shard-*.dat"))) == 4
    finally:
        reopened.close()


def test_open_source_names_a_bad_url() -> None:
    with pytest.raises(ValueError, match="'ftp://x'"):
        open_source("ftp://x")


# -- Bloom filter and negative cache -------------------------------------------------------------


def test_bloom_never_gives_a_false_negative_and_keeps_its_fp_rate() -> None:
    fp_rate = 0.02
    bloom = BloomFilter(20_000, fp_rate)
    present = [f"present-{i}" for i in range(20_000)]
    bloom.update(present)
    assert all(k in bloom for k in present)
    absent = [f"absent-{i}" for i in range(20_000)]
    measured = sum(k in bloom for k in absent) / len(absent)
    assert fp_rate / 2 < measured < fp_rate * 1.5, measured


def test_bloom_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError, match="fp_rate must be in"):
        BloomFilter(10, 1.5)
    with pytest.raises(ValueError, match="capacity must be an integer >= 1, got 0"):
        BloomFilter(0, 0.01)


def test_negative_cache_expires_and_is_bounded() -> None:
    neg = NegativeCache(ttl_s=0.05, max_entries=3)
    for k in "abcd":
        neg.add(k)
    assert "a" not in neg  # pushed out by the bound
    assert all(k in neg for k in "bcd")
    assert len(neg) == 3
    time.sleep(0.08)
    assert "b" not in neg


# -- the tiered read-through ---------------------------------------------------------------------


class CountingSource(WrappedSource):
    """A real FileSource, counting the keys looked up in it."""

    def __init__(self, inner: FeatureSource) -> None:
        super().__init__(inner)
        self.looked_up: list[str] = []
        self.round_trips = 0

    def get_many(self, keys):  # type: ignore[no-untyped-def]
        keys = list(keys)
        self.looked_up += keys
        self.round_trips += 1
        return self.inner.get_many(keys)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[tuple[FeatureStore, CountingSource, Metrics]]:
    files = FileSource(tmp_path / "src")
    files.put_many({f"k{i}": f"v{i}".encode() for i in range(200)})
    source = CountingSource(files)
    metrics = Metrics(CollectorRegistry())
    bloom = BloomFilter(1000, 0.01)
    bloom.update(source.keys())
    tables = PartitionedTables(tmp_path / "l2", 1 << 20, 0.0, changelog=None)
    tables.assign([0])
    fs = FeatureStore(source, MemoryTier(1 << 20), tables, metrics, bloom, NegativeCache(5, 100))
    yield fs, source, metrics
    fs.close()


def _count(metrics: Metrics, tier: str, result: str) -> float:
    return (
        metrics.registry.get_sample_value(
            "sluice_cache_requests_total", {"tier": tier, "result": result}
        )
        or 0.0
    )


def test_read_through_fills_the_tiers(store: tuple[FeatureStore, CountingSource, Metrics]) -> None:
    fs, source, metrics = store
    assert fs.lookup("k1", 0) == b"v1"
    assert source.looked_up == ["k1"]
    assert _count(metrics, "l3", "hit") == 1
    assert fs.l2 is not None and fs.l2.get("k1", 0) == b"v1"
    assert fs.lookup("k1", 0) == b"v1"
    assert _count(metrics, "l1", "hit") == 1
    fs.l1.clear()
    assert fs.lookup("k1", 0) == b"v1"  # from L2, which refills L1
    assert _count(metrics, "l2", "hit") == 1
    assert fs.l1.get("k1") == b"v1"
    assert source.looked_up == ["k1"]
    # A partition this worker does not own has no L2 here: L1 and L3 only.
    assert fs.lookup("k2", 1) == b"v2"
    assert fs.l2.get("k2", 1) is None


def test_absent_keys_do_not_reach_the_source(
    store: tuple[FeatureStore, CountingSource, Metrics],
) -> None:
    fs, source, metrics = store
    for _ in range(3):
        for i in range(500):
            assert fs.lookup(f"absent-{i}", 0) is None
    # Only the Bloom filter's false positives reach the source, once each: then the
    # negative cache answers.
    assert len(source.looked_up) == len(set(source.looked_up))
    assert len(source.looked_up) / 1500 < 0.05
    assert _count(metrics, "l3", "negative") == 1500 - len(source.looked_up)


# -- the result cache ----------------------------------------------------------------------------


def _inputs(x: float) -> list[codec.Tensor]:
    return [codec.Tensor("features", "FP32", [2], [x, x])]


def test_result_cache_never_serves_another_version(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    cache = ResultCache(MemoryTier(1 << 20), RocksDBTier(tmp_path / "rc", 1 << 20), 60, metrics)
    out = [("logits", np.arange(4, dtype=np.float32))]
    k1 = ResultCache.key("demo", "1", _inputs(0.5))
    cache.put(k1, "demo", "1", out)
    got = cache.get(k1, "demo", "1")
    assert got is not None and got[0][0] == "logits"
    np.testing.assert_array_equal(got[0][1], out[0][1])
    k2 = ResultCache.key("demo", "2", _inputs(0.5))
    assert k2 != k1
    assert cache.get(k2, "demo", "2") is None
    # Even under the same key, an entry made by version 1 is never served for version 2.
    assert cache.get(k1, "demo", "2") is None
    assert ResultCache.key("demo", "1", _inputs(0.25)) != k1
    cache.l1.clear()
    assert cache.get(k1, "demo", "1") is not None  # from L2
    assert (
        metrics.registry.get_sample_value(
            "sluice_cache_requests_total", {"tier": "result", "result": "hit"}
        )
        == 2
    )
    cache.close()


def test_bloom_refresh_makes_new_source_keys_visible(
    store: tuple[FeatureStore, CountingSource, Metrics],
) -> None:
    fs, source, _metrics = store
    assert fs.lookup("late", 0) is None
    source.put_many({"late": b"arrived"})
    fs.negative.discard("late")  # type: ignore[union-attr]
    assert fs.lookup("late", 0) is None  # the filter was built before the key existed
    fs.bloom_capacity, fs.bloom_fp_rate = 1000, 0.01
    fs.refresh_bloom()
    assert fs.lookup("late", 0) == b"arrived"


def test_prefetch_many_takes_one_round_trip(
    store: tuple[FeatureStore, CountingSource, Metrics],
) -> None:
    fs, source, _metrics = store
    fs.l1.put("k9", b"v9")
    result = fs.prefetch_many([("k1", 0), ("k2", 1), ("k9", 0), ("k404", 0)])
    assert result == {"k1": True, "k2": True, "k9": None, "k404": False}
    assert source.round_trips == 1
    assert set(source.looked_up) <= {"k1", "k2", "k404"}  # k404 only as a Bloom false positive
    assert fs.l1.get("k1") == b"v1" and fs.l1.get("k2") == b"v2"
    assert fs.l2 is not None and fs.l2.get("k1", 0) == b"v1"


class SlowChangelog:
    """A changelog whose restore of each partition waits at ``gate``: one record, ``k``."""

    def __init__(self, fail: bool = False) -> None:
        self.gate, self.entered, self.written = threading.Event(), threading.Event(), []
        self.fail = fail

    def restore(self, partition: int, store: RocksDBTier) -> int:
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("the changelog could not be read")
        store.put("k", b"restored")
        return 1

    def write(self, partition: int, key: str, value: bytes | None) -> None:
        self.written.append((partition, key))

    def flush(self) -> None: ...

    def close(self) -> None: ...


def put_waiting_for_the_restore(
    tables: PartitionedTables, changelog: SlowChangelog, key: str, partition: int
) -> threading.Thread:
    """A put of ``fetched`` under ``key``, seen to wait while ``partition`` restores; the
    restore then let go on."""
    put = threading.Thread(target=tables.put, args=(key, b"fetched", partition))
    put.start()
    time.sleep(0.2)
    assert put.is_alive(), f"the put must wait for partition {partition}'s restore"
    changelog.gate.set()
    return put


def test_a_put_during_a_partitions_restore_waits_for_it_and_lands(tmp_path: Path) -> None:
    """A worker may serve (and fetch) while a partition's table restores from its changelog
    (faust's signals do not hold records back): what it fetches must still reach the table,
    after the restored records, and the changelog."""
    changelog = SlowChangelog()
    tables = PartitionedTables(tmp_path / "t", 1 << 20, 0.0, changelog)  # type: ignore[arg-type]
    assigning = threading.Thread(target=tables.assign, args=([3],))
    assigning.start()
    assert changelog.entered.wait(10)
    assert tables.owns(3) and tables.partitions == []  # restoring: not serving yet
    put = put_waiting_for_the_restore(tables, changelog, "k", 3)
    assigning.join(10)
    put.join(10)
    assert tables.get("k", 3) == b"fetched"  # after the restored value, not under it
    assert changelog.written == [(3, "k")]
    tables.close()


def test_every_claimed_partition_waits_while_the_first_restores(tmp_path: Path) -> None:
    """Partitions are marked restoring together, when claimed: a record of the second,
    served while the first restores, still reaches the second's table."""
    changelog = SlowChangelog()
    tables = PartitionedTables(tmp_path / "t", 1 << 20, 0.0, changelog)  # type: ignore[arg-type]
    restore = tables.claim([0, 1])
    assert tables.owns(0) and tables.owns(1) and tables.partitions == []
    restoring = threading.Thread(target=restore)
    restoring.start()
    assert changelog.entered.wait(10)  # partition 0 is restoring; 1 has not started
    put = put_waiting_for_the_restore(tables, changelog, "j", 1)
    restoring.join(10)
    put.join(10)
    assert tables.partitions == [0, 1]
    assert tables.get("j", 1) == b"fetched"
    assert changelog.written == [(1, "j")]
    tables.close()


def test_a_failed_restore_leaves_its_partitions_unowned(tmp_path: Path) -> None:
    changelog = SlowChangelog(fail=True)
    changelog.gate.set()
    tables = PartitionedTables(tmp_path / "t", 1 << 20, 0.0, changelog)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="could not be read"):
        tables.assign([0, 1])
    assert not tables.owns(0) and not tables.owns(1)
    assert tables.put("k", b"v", 1) is False  # at once: nothing left to wait for
    tables.close()
