"""``sluice bench --scenario prefetch``: the feature tiers and the prefetcher on a replayed
trace, end to end through Kafka (the batch engine, fused, in this process).

A seeded trace with realistic structure: sessions walk routes (sequences of keys spread
over the key space; route popularity is Zipf) with a little noise (jumps to a
Zipf-popular key), interleaved at random. The same trace shuffled keeps the popularity and
loses the sequences; a third variant replaces 20 % of requests with keys that do not
exist. The cold source (files on local disk) is wrapped here, in the harness only, to take
~5 ms a lookup. The caches hold about 5 % of the key space.

After an unreported warm-up, four phases at the offered rate, each on fresh topics and
stores: patterned with prefetch, patterned without, shuffled with prefetch, and 20 % absent
with prefetch; then the first two again at twice the rate. The loads: a gateway that
waited on the source once per cache miss could serve at most 1 / (miss rate x 5 ms), about
770 req/s without prefetch (26 % misses), so 400 req/s is half of that and 800 req/s just
past it. The gateway now fetches a consumed batch's misses in one round trip, so neither
load saturates it (its capacity grows with the batch size); the figures say what prefetch
still saves at those loads. Hit rates and latencies count the second half of each trace
(the first half is the predictor's warm-up). Then the result cache's hit path and a model
call are timed in-process. The last stdout line is one JSON object with every figure from
this one run.
"""

from __future__ import annotations

import gc
import json
import math
import sys
import tempfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import Settings
from pipeline.features.base import FeatureSource, WrappedSource, entry_bytes
from pipeline.features.bloom import BloomFilter
from pipeline.models import ConcatMLP, ModelConfig, ModelRegistry, TensorSpec, save_model
from pipeline.observability.metrics import Metrics

FEATURE_MODEL = "recommend"
QUERY_DIM = 8
FEATURE_DIM = 32
L3_DELAY_S = 0.005
WARMUP_FRACTION = 0.5
ABSENT_FRACTION = 0.2


# -- the model: a query from the request, a user vector from the feature store -------------


def init_feature_model(
    model_dir: Path, name: str = FEATURE_MODEL, version: str = "1", seed: int = 0
) -> Path:
    """An MLP over a request's ``query`` and the ``user`` features the gateway fills from
    the feature store by the request's key."""
    torch.manual_seed(seed)
    arch_config: dict[str, Any] = {
        "in_features": QUERY_DIM + FEATURE_DIM, "hidden": [32], "out_features": 4,
    }  # fmt: skip
    config = ModelConfig(
        format="safetensors",
        inputs=(
            TensorSpec("query", "FP32", (QUERY_DIM,)),
            TensorSpec("user", "FP32", (FEATURE_DIM,)),
        ),
        outputs=(TensorSpec("scores", "FP32", (4,)),),
        arch="concat_mlp",
        arch_config=arch_config,
    )
    path = save_model(model_dir, name, version, ConcatMLP(**arch_config), config)
    raw = json.loads((path / "config.json").read_text())
    raw["features"] = {"input": "user"}
    (path / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return path


def feature_value(key: str, dim: int = FEATURE_DIM) -> bytes:
    """Deterministic FP32 features for a key (little-endian bytes, as the store holds them)."""
    seed = zlib.crc32(key.encode())
    return np.random.default_rng(seed).standard_normal(dim).astype("<f4").tobytes()


def feature_request(request_id: str, key: str, model: str = FEATURE_MODEL) -> dict[str, Any]:
    return {
        "id": request_id,
        "model": model,
        "key": key,
        "inputs": [{"name": "query", "datatype": "FP32", "shape": [QUERY_DIM],
                    "data": [0.25] * QUERY_DIM}],
    }  # fmt: skip


# -- the trace ----------------------------------------------------------------------------


def key_name(i: int) -> str:
    return f"k{i:06d}"


def patterned_trace(
    n: int,
    keys: int = 10_000,
    sessions: int = 50,
    seed: int = 7,
    routes: int = 30,
    route_length: int = 20,
    noise: float = 0.02,
    zipf_s: float = 1.1,
) -> list[tuple[str, str]]:
    """``(session, key)`` pairs: sessions walking Zipf-popular routes, a little noise."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, keys + 1) ** zipf_s
    weights /= weights.sum()
    ranks = rng.permutation(keys)  # popularity rank -> key
    paths = [rng.choice(keys, size=route_length, replace=False) for _ in range(routes)]
    route_weights = 1.0 / np.arange(1, routes + 1) ** zipf_s
    route_weights /= route_weights.sum()
    state = [[int(rng.choice(routes, p=route_weights)), 0] for _ in range(sessions)]
    who = rng.integers(0, sessions, size=n)
    coin = rng.random(n)
    jumps = ranks[rng.choice(keys, size=n, p=weights)]
    out = []
    for i in range(n):
        s = int(who[i])
        route, pos = state[s]
        if coin[i] < noise:
            k = int(jumps[i])
        else:
            k = int(paths[route][pos])
            pos += 1
            if pos == route_length:
                route, pos = int(rng.choice(routes, p=route_weights)), 0
            state[s] = [route, pos]
        out.append((f"s{s}", key_name(k)))
    return out


def shuffled(trace: list[tuple[str, str]], seed: int = 11) -> list[tuple[str, str]]:
    """The same requests in random order: popularity kept, sequences gone."""
    order = np.random.default_rng(seed).permutation(len(trace))
    return [trace[i] for i in order]


def with_absent(
    trace: list[tuple[str, str]], fraction: float = ABSENT_FRACTION, seed: int = 13,
    absent_keys: int = 2000,
) -> list[tuple[str, str]]:  # fmt: skip
    """``fraction`` of the requests replaced by keys that do not exist (``x...``)."""
    rng = np.random.default_rng(seed)
    out = list(trace)
    for i in np.flatnonzero(rng.random(len(trace)) < fraction):
        out[i] = (trace[i][0], f"x{int(rng.integers(absent_keys)):06d}")
    return out


def ideal_miss_rate(
    trace: list[tuple[str, str]], cache_entries: int, settings: Settings, hot_every: int = 400
) -> float:
    """The share of the trace's second half that misses an LRU of ``cache_entries`` keys when
    every key the predictor names (with ``settings``' fanout, share and depth) is fetched the
    instant it is named: what no timing can improve on, for this trace and cache size."""
    from collections import OrderedDict

    from pipeline.features.prefetch import Predictor

    predictor = Predictor(settings.prefetch_max_keys, fanout=settings.prefetch_fanout)
    lru: OrderedDict[str, None] = OrderedDict()

    def put(key: str) -> None:
        lru[key] = None
        lru.move_to_end(key)
        if len(lru) > cache_entries:
            lru.popitem(last=False)

    half, misses = len(trace) // 2, 0
    for i, (session, key) in enumerate(trace):
        misses += i >= half and key not in lru
        put(key)
        predictor.observe(session, key, 0)
        for k, _ in predictor.predict(key, settings.prefetch_depth, settings.prefetch_min_share):
            put(k)
        if settings.prefetch_hot_keys and i % hot_every == 0:
            for k, _ in predictor.hot(settings.prefetch_hot_keys):
                put(k)
    return misses / max(1, len(trace) - half)


# -- the slow source (harness only) ---------------------------------------------------------


class DelayedSource(WrappedSource):
    """Wraps a source: each lookup takes ``delay_s`` more (the bench's remote store)."""

    def __init__(self, inner: FeatureSource, delay_s: float) -> None:
        super().__init__(inner)
        self.delay_s = delay_s
        self.lookups = 0
        self.absent_lookups = 0
        self._lock = threading.Lock()

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        time.sleep(self.delay_s)
        out = self.inner.get_many(keys)
        with self._lock:
            self.lookups += len(keys)
            self.absent_lookups += sum(1 for k in keys if k not in out)
        return out


# -- one phase, end to end ------------------------------------------------------------------


def _phase(
    base: Settings,
    workdir: Path,
    name: str,
    trace: list[tuple[str, str]],
    rate: float,
    prefetch: bool,
    progress: bool,
) -> dict[str, Any]:
    from pipeline.kafka import delete_topics, ensure_topics, pipeline_topics

    settings = base.replace(
        topic_prefix=f"bp{uuid.uuid4().hex[:8]}",
        feature_l2_path=workdir / f"tables-{name}",
        prefetch_enabled=prefetch,
        worker_id=name,
    )
    registry = ModelRegistry(settings.models_path, device=torch.device("cpu"))
    topics = pipeline_topics(settings, registry.names)
    ensure_topics(settings, topics)
    try:
        return _drive_phase(settings, registry, name, trace, rate, progress)
    finally:
        delete_topics(settings, [*topics, settings.features_changelog_topic])


def _drive_phase(
    settings: Settings,
    registry: ModelRegistry,
    name: str,
    trace: list[tuple[str, str]],
    rate: float,
    progress: bool,
) -> dict[str, Any]:
    from confluent_kafka import Consumer, Producer

    from pipeline.engines.batch import BatchEngine
    from pipeline.engines.topology import Stage
    from pipeline.kafka import consume_batch, consumer_config, producer_config
    from pipeline.serving import SESSION_HEADER, Pipeline

    registry.load_all()
    metrics = Metrics()
    pipeline = Pipeline(settings, registry, None, metrics)
    assert pipeline.features is not None
    source = DelayedSource(pipeline.features.source, L3_DELAY_S)
    pipeline.features.source = source
    engine = BatchEngine(settings, Stage.FUSED, pipeline)
    worker = threading.Thread(target=engine.run, name=f"bench-{name}", daemon=True)
    worker.start()

    sent_at: dict[str, float] = {}
    answers: dict[str, tuple[float, str]] = {}
    consumer = Consumer(consumer_config(settings, f"{settings.topic_prefix}-bench"))
    consumer.subscribe([settings.responses_topic])
    producer = Producer(producer_config(settings))
    warm = int(len(trace) * WARMUP_FRACTION)
    snapshot: dict[str, float] = {}

    def counters() -> dict[str, float]:
        out = {}
        for tier in ("l1", "l2", "l3"):
            for result in ("hit", "miss", "negative"):
                v = metrics.registry.get_sample_value(
                    "sluice_cache_requests_total", {"tier": tier, "result": result}
                )
                out[f"{tier}_{result}"] = v or 0.0
        return out

    reading = threading.Event()
    reading.set()

    def read() -> None:
        """Answers, timed as they arrive (on a thread: the sending loop must not delay it)."""
        while reading.is_set():
            messages = consume_batch(consumer, 500, 0.05)
            now = time.time()
            for m in messages:
                value = m.value()
                if m.error() is None and value:
                    body = json.loads(value)
                    answers.setdefault(body["id"], (now, body["status"]))

    reader = threading.Thread(target=read, name=f"bench-reader-{name}", daemon=True)
    reader.start()

    # The engine must own its partitions (and their restored tables) before timing starts.
    probe = f"{name}-probe"
    producer.produce(settings.requests_topic, json.dumps(feature_request(probe, trace[0][1])),
                     trace[0][1].encode())  # fmt: skip
    producer.flush(10)
    deadline = time.monotonic() + 90
    while probe not in answers:
        if time.monotonic() > deadline or not worker.is_alive():
            raise RuntimeError(f"bench phase {name}: the worker never answered")
        time.sleep(0.05)
    # What exists now lives through the phase: keep it out of the collector's full passes,
    # as the worker does (they show up as tail latency).
    gc.collect()
    gc.freeze()
    start = time.monotonic()
    for i, (session, key) in enumerate(trace):
        due = start + i / rate
        if (now := time.monotonic()) < due:
            time.sleep(due - now)
        if i == warm:
            snapshot = counters()
        rid = f"{name}-{i}"
        sent_at[rid] = time.time()
        producer.produce(
            settings.requests_topic, json.dumps(feature_request(rid, key)), key.encode(),
            headers=[(SESSION_HEADER, session.encode())],
        )  # fmt: skip
        producer.poll(0)
        if progress and i % 1000 == 0:
            print(f"  {name}: {i}/{len(trace)} sent, {len(answers)} answered", file=sys.stderr)
    producer.flush(30)
    deadline = time.monotonic() + 120
    while len([r for r in sent_at if r in answers]) < len(trace) and time.monotonic() < deadline:
        time.sleep(0.1)
    after = counters()
    reading.clear()
    reader.join(10)
    gc.unfreeze()
    engine.stop()
    worker.join(30)
    consumer.close()
    prefetch_stats = pipeline.features.prefetcher.stats() if pipeline.features.prefetcher else {}
    pipeline.close()

    measured = [f"{name}-{i}" for i in range(warm, len(trace))]
    latencies = [
        (answers[r][0] - sent_at[r]) * 1000.0
        for r in measured
        if r in answers and answers[r][1] == "ok"
    ]
    d = {k: after[k] - snapshot.get(k, 0.0) for k in after}
    lookups = d["l1_hit"] + d["l1_miss"]
    absent_requests = sum(1 for _, k in trace if k.startswith("x"))
    return {
        "sent": len(trace),
        "answered": sum(1 for r in sent_at if r in answers),
        "errors": sum(1 for r in sent_at if r in answers and answers[r][1] != "ok"),
        "hit_rate": (d["l1_hit"] + d["l2_hit"]) / lookups if lookups else math.nan,
        "p50_ms": float(np.percentile(latencies, 50)) if latencies else math.nan,
        "p95_ms": float(np.percentile(latencies, 95)) if latencies else math.nan,
        "p99_ms": float(np.percentile(latencies, 99)) if latencies else math.nan,
        "mean_ms": float(np.mean(latencies)) if latencies else math.nan,
        "l3_lookups": source.lookups,
        "l3_absent_lookups": source.absent_lookups,
        "absent_requests": absent_requests,
        "prefetch_precision": prefetch_stats.get("precision", math.nan),
        "prefetch_coverage": prefetch_stats.get("coverage", math.nan),
    }


# -- the result cache, in process -----------------------------------------------------------


def _result_cache_timing(base: Settings, workdir: Path, iterations: int = 300) -> dict[str, float]:
    """Median time to answer from the result cache vs to admit and run the model."""
    from pipeline.serving import Job, Origin, Pipeline

    def pipeline_with(cache: bool, tag: str) -> Pipeline:
        s = base.replace(
            result_cache_enabled=cache, prefetch_enabled=False, feature_l2_max_bytes=0,
            feature_l2_path=workdir / f"rc-{tag}", bootstrap=base.bootstrap,
        )  # fmt: skip
        registry = ModelRegistry(s.models_path, device=torch.device("cpu"))
        registry.load_all()
        return Pipeline(s, registry, None, Metrics())

    value = json.dumps(feature_request("rc", key_name(1))).encode()
    origin = Origin("bench", 0, 0, time.time() * 1000.0, value)

    cached = pipeline_with(True, "on")
    first = cached.admit_or_reject(origin)
    assert isinstance(first, Job), first
    cached.response_records(cached.infer([first]), "infer")
    hit_s = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        answered = cached.admit_or_reject(origin)
        hit_s.append(time.perf_counter() - t0)
        assert not isinstance(answered, Job), "expected a result-cache hit"
    cached.close()

    plain = pipeline_with(False, "off")
    model_s = []
    for _ in range(iterations):
        t0 = time.perf_counter()
        job = plain.admit_or_reject(origin)
        assert isinstance(job, Job)
        plain.response_records(plain.infer([job]), "infer")
        model_s.append(time.perf_counter() - t0)
    plain.close()
    return {
        "result_cache_hit_ms": float(np.median(hit_s) * 1000.0),
        "model_call_ms": float(np.median(model_s) * 1000.0),
    }


# -- the scenario -----------------------------------------------------------------------------


def run(
    settings: Settings, requests: int = 10_000, rate: float | None = None, progress: bool = True
) -> dict[str, Any]:
    """Six phases of ``requests // 2`` requests each: four at ``rate`` req/s (default 400),
    and the p99 pair again at twice the rate."""
    from pipeline.features.sources.files import FileSource
    from pipeline.ops.broker import LocalBroker

    n = max(200, requests // 2)
    rate = rate or 400.0
    local = None
    if not settings.bootstrap:
        local = LocalBroker(settings.cache_dir / "broker", settings.cache_dir)
        if local.state() is not None:
            local = None  # already running: not ours to stop
        else:
            local.start()
        settings = settings.replace(bootstrap=settings.bootstrap_servers())
    keys = 10_000
    try:
        with tempfile.TemporaryDirectory(prefix="sluice-bench-prefetch-") as tmp:
            workdir = Path(tmp)
            init_feature_model(workdir / "models")
            source = FileSource(workdir / "features")
            source.put_many({key_name(i): feature_value(key_name(i)) for i in range(keys)})
            source.close()
            l1_entries = 250  # caches for ~5 % of the keys
            entry = entry_bytes(key_name(0), feature_value(key_name(0)))
            base = settings.replace(
                model_dir=workdir / "models",
                feature_source=f"files://{workdir / 'features'}",
                feature_l1_max_bytes=l1_entries * entry,
                feature_l2_max_bytes=l1_entries * entry,
                bloom_capacity=keys,
                bloom_fp_rate=0.01,
                partitions=1,
                prefetch_concurrency=4,
                prefetch_budget_per_s=2000.0,
                prefetch_hot_keys=32,
            )
            trace = patterned_trace(n, keys)
            high = 2 * rate
            phases = {
                "patterned": (trace, True, rate),
                "no_prefetch": (trace, False, rate),
                "shuffled": (shuffled(trace), True, rate),
                "absent": (with_absent(trace), True, rate),
                "patterned_high_load": (trace, True, high),
                "no_prefetch_high_load": (trace, False, high),
            }
            # Whichever phase ran first was the slowest (broker, page cache and allocator
            # warming up): a short phase that is not reported goes first.
            warmup = shuffled(trace, seed=17)[: min(len(trace), 1000)]
            _phase(base, workdir, "warmup", warmup, rate, False, False)
            gc.collect()
            results = {}
            for name, (t, prefetch, r) in phases.items():
                if progress:
                    print(f"phase {name}: {len(t)} requests at {r:g}/s", file=sys.stderr)
                results[name] = _phase(base, workdir, name, t, r, prefetch, progress)
                gc.collect()  # the phase's Kafka clients close now, not at exit
            timing = _result_cache_timing(base, workdir)
            bloom = BloomFilter(keys, base.bloom_fp_rate)
            bloom.update(key_name(i) for i in range(keys))
            false_positives = sum(f"x{i:06d}" in bloom for i in range(keys))
    finally:
        if local is not None:
            local.stop()
    absent = results["absent"]
    return _finite(
        {
            "scenario": "prefetch",
            "end_to_end": "batch engine, fused, through the Kafka broker",
            "requests_per_phase": n,
            "rate": rate,
            "keys": keys,
            "cache_entries": {"l1": l1_entries, "l2": l1_entries},
            "l3_delay_ms": L3_DELAY_S * 1000.0,
            "hit_rate_patterned": results["patterned"]["hit_rate"],
            "hit_rate_shuffled": results["shuffled"]["hit_rate"],
            "hit_rate_no_prefetch": results["no_prefetch"]["hit_rate"],
            "p99_ms_prefetch": results["patterned"]["p99_ms"],
            "p99_ms_no_prefetch": results["no_prefetch"]["p99_ms"],
            "p50_ms_prefetch": results["patterned"]["p50_ms"],
            "p50_ms_no_prefetch": results["no_prefetch"]["p50_ms"],
            "p95_ms_prefetch": results["patterned"]["p95_ms"],
            "p95_ms_no_prefetch": results["no_prefetch"]["p95_ms"],
            "mean_ms_prefetch": results["patterned"]["mean_ms"],
            "mean_ms_no_prefetch": results["no_prefetch"]["mean_ms"],
            "high_load_rate": high,
            "p99_ms_prefetch_high_load": results["patterned_high_load"]["p99_ms"],
            "p99_ms_no_prefetch_high_load": results["no_prefetch_high_load"]["p99_ms"],
            "prefetch_precision": results["patterned"]["prefetch_precision"],
            "prefetch_coverage": results["patterned"]["prefetch_coverage"],
            # Below ~1 %, p99 with prefetch can leave the source round trip behind; above, not.
            "ideal_miss_rate_patterned": ideal_miss_rate(trace, l1_entries, base),
            "l3_lookups_per_absent_request": (
                absent["l3_absent_lookups"] / absent["absent_requests"]
                if absent["absent_requests"]
                else math.nan
            ),
            "absent_requests": absent["absent_requests"],
            "bloom_fp_rate": base.bloom_fp_rate,
            "bloom_fp_rate_measured": false_positives / keys,
            **timing,
            "phases": results,
        }
    )


def _finite(value: Any) -> Any:
    """NaN (a figure with nothing to count) as null: strict JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    return value
