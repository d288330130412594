"""The predictor, the prefetcher's bounds and metrics, and the trace generator."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from benchmarks.bench_prefetch import patterned_trace, shuffled, with_absent
from pipeline.features.bloom import BloomFilter, NegativeCache
from pipeline.features.memory import MemoryTier
from pipeline.features.prefetch import Predictor, Prefetcher, TokenBucket
from pipeline.features.sources.files import FileSource
from pipeline.features.store import FeatureStore
from pipeline.observability.metrics import Metrics


def test_predictor_learns_per_session_transitions() -> None:
    p = Predictor(max_keys=100)
    for _ in range(3):
        for session in ("s1", "s2"):
            for key in ("a", "b", "c"):
                p.observe(session, key, partition=1)
    assert p.predict("a", depth=1) == [("b", 1)]
    assert p.predict("a", depth=2) == [("b", 1), ("c", 1)]
    assert p.predict("unknown") == []
    # Interleaved sessions do not make transitions between each other's keys.
    q = Predictor(max_keys=100)
    for _ in range(5):
        q.observe("s1", "x1", 0)
        q.observe("s2", "y1", 0)
        q.observe("s1", "x2", 0)
        q.observe("s2", "y2", 0)
    assert [k for k, _ in q.predict("x1")] == ["x2"]
    assert [k for k, _ in q.predict("y1")] == ["y2"]


def test_predictor_follows_a_changing_workload() -> None:
    p = Predictor(max_keys=100, half_life_events=10)
    for _ in range(20):
        p.observe("s", "a", 0)
        p.observe("s", "old", 0)
    for _ in range(20):
        p.observe("s", "a", 0)
        p.observe("s", "new", 0)
    assert p.predict("a")[0][0] == "new"


def test_predictor_tables_are_bounded() -> None:
    p = Predictor(max_keys=50, fanout=3)
    for i in range(1000):
        p.observe(f"s{i % 7}", f"k{i}", 0)
        p.observe(f"s{i % 7}", f"k{i % 11}", 0)
    assert len(p._next) <= 50
    assert len(p._seen) <= 50
    assert len(p._last) <= 50
    assert all(len(s) <= 3 for s in p._next.values())
    hot = p.hot(5)
    assert len(hot) == 5 and {k for k, _ in hot} <= {f"k{i}" for i in range(11)}


def test_token_bucket_bounds_the_rate() -> None:
    bucket = TokenBucket(rate_per_s=100.0, burst=1)
    stop = threading.Event()
    taken = 0
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.2:
        taken += bucket.take(stop)
    # 0.2 s at 100/s, plus the burst: never many more (no timing lower bound asserted).
    assert taken <= 1 + 100 * (time.monotonic() - t0) + 1
    stop.set()
    assert bucket.take(stop) is False


def _store(tmp_path: Path, metrics: Metrics) -> FeatureStore:
    files = FileSource(tmp_path / "src")
    files.put_many({f"k{i}": f"v{i}".encode() for i in range(100)})
    bloom = BloomFilter(1000, 0.01)
    bloom.update(files.keys())
    return FeatureStore(files, MemoryTier(1 << 20), None, metrics, bloom, NegativeCache(5, 100))


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_prefetcher_warms_predicted_keys_and_counts_precision(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    store = _store(tmp_path, metrics)
    prefetcher = Prefetcher(store, metrics, Predictor(100), concurrency=2, depth=1)
    store.prefetcher = prefetcher
    store.start()
    try:
        for key in ("k1", "k2", "k1", "k2"):
            assert store.lookup(key, 0) is not None
            prefetcher.observe("s", key, 0)
        assert prefetcher.wait_idle()
        store.l1.clear()
        prefetcher.observe("s", "k1", 0)  # predicts k2: fetched into L1 off the caller
        deadline = time.monotonic() + 10
        while not store.l1.contains("k2") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert store.l1.contains("k2")
        assert store.lookup("k2", 0) == b"v2"
        assert _value(metrics, "sluice_prefetch_total", result="used") == 1
        assert _value(metrics, "sluice_prefetch_coverage_total", result="covered") == 1
        assert _value(metrics, "sluice_prefetch_coverage_total", result="uncovered") == 4
        stats = prefetcher.stats()
        assert stats["precision"] == 1.0 and stats["coverage"] == 0.2
    finally:
        store.close()


def test_prefetcher_drops_work_rather_than_block(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    store = _store(tmp_path, metrics)
    # Not started: nothing drains the queue, and submitting must still never wait.
    prefetcher = Prefetcher(store, metrics, Predictor(100), queue_size=3)
    accepted = sum(prefetcher.submit(f"k{i}", 0) for i in range(50))
    assert accepted == 3
    assert prefetcher.submit("k0", 0) is False  # already queued: not twice
    assert _value(metrics, "sluice_prefetch_skipped_total", reason="queue_full") == 47
    store.close()


def test_prefetcher_skips_absent_and_cached_keys(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    store = _store(tmp_path, metrics)
    store.l1.put("k5", b"v5")
    assert store.prefetch("k5", 0) is None
    assert store.prefetch("nope", 0) is False
    assert store.prefetch("k6", 0) is True
    assert store.l1.get("k6") == b"v6"
    store.close()


@pytest.mark.parametrize("bad", [0, -2])
def test_prefetcher_names_bad_settings(tmp_path: Path, bad: int) -> None:
    metrics = Metrics(CollectorRegistry())
    store = _store(tmp_path, metrics)
    with pytest.raises(ValueError, match=f"concurrency must be an integer >= 1, got {bad}"):
        Prefetcher(store, metrics, Predictor(10), concurrency=bad)
    store.close()


def test_traces_are_reproducible_and_structured() -> None:
    a = patterned_trace(2000, keys=1000, seed=3)
    assert a == patterned_trace(2000, keys=1000, seed=3)
    assert a != patterned_trace(2000, keys=1000, seed=4)
    s = shuffled(a)
    assert sorted(s) == sorted(a) and s != a
    absent = with_absent(a, 0.2)
    share = sum(k.startswith("x") for _, k in absent) / len(absent)
    assert 0.15 < share < 0.25

    # Sequential structure: the predictor, trained on the first half, predicts most next keys
    # of the patterned trace and few of the shuffled one.
    def predictable(trace: list[tuple[str, str]]) -> float:
        p = Predictor(10_000)
        last: dict[str, str] = {}
        right = total = 0
        for i, (session, key) in enumerate(trace):
            if i >= len(trace) // 2 and session in last:
                total += 1
                right += key in {k for k, _ in p.predict(last[session], 1)}
            p.observe(session, key, 0)
            last[session] = key
        return right / total

    assert predictable(a) > 0.7
    assert predictable(s) < 0.3


class _GatedSource(FileSource):
    """A source whose lookups of ``gated`` keys wait until ``gate`` opens."""

    def __init__(self, directory: Path, gated: set[str]) -> None:
        super().__init__(directory)
        self.gated = gated
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls: list[list[str]] = []

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        self.calls.append(keys)
        if self.gated & set(keys):
            self.entered.set()
            self.gate.wait(30)
        return super().get_many(keys)


def test_a_request_never_waits_behind_a_prefetch_in_progress(tmp_path: Path) -> None:
    metrics = Metrics(CollectorRegistry())
    source = _GatedSource(tmp_path / "src", gated={"k9"})
    source.put_many({f"k{i}": f"v{i}".encode() for i in range(10)})
    store = FeatureStore(source, MemoryTier(1 << 20), None, metrics, None, NegativeCache(5, 100))
    prefetcher = Prefetcher(store, metrics, Predictor(100), concurrency=1, batch_max=1)
    store.prefetcher = prefetcher
    store.start()
    answered: dict[str, bytes | None] = {}
    try:
        assert prefetcher.submit("k1", 0)
        assert prefetcher.wait_idle()
        assert prefetcher.submit("k9", 0)  # the only prefetch thread now waits on the source
        assert source.entered.wait(10)
        # A prefetched key, and a batch with a miss: answered while that fetch is still held.
        reader = threading.Thread(
            target=lambda: answered.update(store.lookup_many([("k1", 0), ("k2", 0), ("k3", 0)]))
        )
        reader.start()
        reader.join(10)
        assert not reader.is_alive(), "the request path waited for the prefetcher"
        assert not source.gate.is_set()
        assert answered == {"k1": b"v1", "k2": b"v2", "k3": b"v3"}
        assert source.calls[-1] == ["k2", "k3"]  # the batch's misses: one round trip
        assert _value(metrics, "sluice_prefetch_coverage_total", result="covered") == 1
    finally:
        source.gate.set()
        store.close()


def test_ideal_miss_rate_is_the_floor_that_noise_sets() -> None:
    from benchmarks.bench_prefetch import ideal_miss_rate
    from pipeline.config import Settings

    settings = Settings()
    walks = patterned_trace(4000, keys=1000, seed=3, noise=0.0)
    noisy = patterned_trace(4000, keys=1000, seed=3, noise=0.1)
    assert 0.0 <= ideal_miss_rate(walks, 100, settings) < ideal_miss_rate(noisy, 100, settings)
    # A cache that holds every key misses only keys never requested (nor predicted) before.
    half = len(noisy) // 2
    first_seen = {}
    for i, (_, key) in enumerate(noisy):
        first_seen.setdefault(key, i)
    compulsory = sum(1 for i in first_seen.values() if i >= half) / half
    assert 0.0 < ideal_miss_rate(noisy, 1000, settings) <= compulsory
