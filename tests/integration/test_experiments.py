"""Experiments on the real broker: a weighted split that holds its weights and its keys
across a restart, a shadow that answers nobody, a slow canary rolled back by the guard, a
bad config refused while the one in force stays, and a report whose figures are the ones
the raw topics give (`benchmarks.bench_experiment`, `pipeline.experiments`)."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_experiment as bench
from benchmarks.harness import TopicReader, Workers, demo_request
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.experiments import load, mirrored, routing_key
from pipeline.experiments.report import collect, summarize
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import init_demo
from pipeline.ops.broker import free_port
from pipeline.protocol import codec
from tests.integration.conftest import make_settings


@pytest.mark.timeout(600)
def test_split_sticky_shadow_rollback_and_the_report(
    bootstrap: str, tmp_path: Path, model_dir: Path
) -> None:
    settings = make_settings(bootstrap, model_dir, partitions=2)
    result = bench.run(settings, requests=20_000, rate=2500.0, progress=False, work=tmp_path)
    print(json.dumps(result))
    # 20,000 requests at 90/10: each share within 1.5 points of its weight.
    assert result["answered"] == 20_000
    assert result["share_error"] <= 0.015, result["shares"]
    # Every key served by one variant, across a restart of the worker.
    assert result["sticky_checked"] >= 5000 and result["sticky_violations"] == 0
    # The shadow answers nobody; its topic has one record per mirrored request.
    assert result["shadow_answers"] == 0
    assert result["shadow_records"] == result["mirrored"] > 0.15 * 20_000
    assert result["shadow_missing"] == 0
    # The slow canary is rolled back within its window (10 s), and serves nothing after.
    assert result["rollback_s"] is not None and result["rollback_s"] <= 10, result
    assert result["canary_answers_after"] == 0
    assert "p50" in result["rollback_reason"] or "p99" in result["rollback_reason"]

    # The report, from the topics, against the ground truth computed here from them.
    observations, pairs = collect(settings, "demo")
    summary = summarize(observations, pairs)
    truth = _ground_truth(settings)
    report = summary["variants"]
    assert set(report) == set(truth)
    for variant, figures in truth.items():
        assert report[variant]["count"] == figures["count"], variant
        assert report[variant]["error_rate"] == pytest.approx(figures["error_rate"], abs=1e-9)
        for q in ("p50", "p99"):
            assert report[variant][f"{q}_ms"] == pytest.approx(figures[q], rel=1e-9, abs=1e-9)
    assert summary["shadows"]["s"]["pairs"] == _pairs(settings) >= result["mirrored"]
    # Version 1 (the shadow) and version 2 are different weights: they disagree somewhat.
    assert 0 <= summary["shadows"]["s"]["top1_agreement"] <= 1
    assert summary["verdict"]


def _pairs(settings: Settings) -> int:
    """Requests with both sides on the raw shadow topic."""
    roles: dict[str, set[str]] = {}
    with TopicReader(settings, settings.shadow_topic) as reader:
        reader.read_until(lambda: False, 5, idle_s=1.0)
        for r in reader.records:
            record = json.loads(r.value or b"{}")
            roles.setdefault(record["id"], set()).add(record["role"])
    return sum(sides == {"primary", "shadow"} for sides in roles.values())


def _ground_truth(settings: Settings) -> dict[str, dict[str, float]]:
    """Per variant, from the raw responses topic: count, error rate, p50 and p99 of total_ms."""
    totals: dict[str, list[float]] = {}
    errors: Counter[str] = Counter()
    with TopicReader(settings, settings.responses_topic) as reader:
        reader.read_until(lambda: False, 10, idle_s=2.0)
        for r in reader.records:
            response = codec.decode_response(r.value or b"")
            if response.variant is None or response.model != "demo":
                continue
            totals.setdefault(response.variant, []).append(
                response.timings.total_ms if response.timings else float("nan")
            )
            errors[response.variant] += response.status != "ok"
    return {
        v: {
            "count": len(t),
            "error_rate": errors[v] / len(t),
            "p50": float(np.nanquantile(t, 0.5)),
            "p99": float(np.nanquantile(t, 0.99)),
        }
        for v, t in totals.items()
    }


@pytest.mark.timeout(300)
def test_a_bad_config_is_refused_and_the_live_one_stays(bootstrap: str, tmp_path: Path) -> None:
    models = tmp_path / "models"
    init_demo(models)
    bench.write_experiment(models, bench.SPLIT)
    settings = make_settings(bootstrap, models, metrics_port=free_port(), experiment_reload_s=0.3)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    workers = Workers(settings, "fused", tmp_path / "logs").start()
    try:
        with Client(settings) as client:
            workers.wait_ready(client)
            bad = {"variants": [{"name": "a", "version": "2", "weight": 90},
                                {"name": "b", "version": "9", "weight": 10}]}  # fmt: skip
            bench.write_experiment(models, bad)
            time.sleep(1.5)  # several reloads
            futures = [client.submit(demo_request(f"q-{i}", key=f"k{i}")) for i in range(400)]
            client.flush()
            variants = Counter(f.result(timeout=60).variant for f in futures)
        # The split in force (a and b at 90/10) still serves; version 9 does not exist.
        assert set(variants) == {"a", "b"}, variants
        with urllib.request.urlopen(f"http://127.0.0.1:{settings.metrics_port}/metrics") as r:
            metrics = r.read().decode()
        refused = re.search(r'sluice_experiment_config_errors_total\{model="demo"\} (\S+)', metrics)
        assert refused and float(refused.group(1)) >= 1, metrics[-2000:]
        assert 'variant="a"' in metrics and 'variant="b"' in metrics
    finally:
        workers.stop()
    log = workers.logs()
    assert "variants[1].version" in log, log[-3000:]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("mode", "engine"), [("split", "batch"), ("fused", "faust")])
def test_variants_and_shadow_in_every_mode_and_engine(
    bootstrap: str, tmp_path: Path, mode: str, engine: str
) -> None:
    models = tmp_path / "models"
    init_demo(models)
    bench.write_experiment(models, bench.SPLIT)
    settings = make_settings(bootstrap, models, engine=engine)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    workers = Workers(settings, mode, tmp_path / "logs").start()
    try:
        with Client(settings) as client:
            workers.wait_ready(client)
            sent = bench.send(client, 1000, 500.0, "m-", keys=1000)
            got = bench.answers(sent)
    finally:
        workers.stop()
    assert len(got) == 1000
    variants = Counter(r.variant for r in got.values())
    assert set(variants) == {"a", "b"} and variants["a"] > variants["b"]
    experiment = load("demo", models / "demo" / "experiment.json", ["1", "2"])
    expected = {rid for rid, key, _ in sent if mirrored(experiment, routing_key(key, rid))}
    sides = [(i, role) for i, role in bench._shadow_sides(settings, len(expected))
             if i.startswith("m-")]  # not the readiness probes  # fmt: skip
    assert sorted(i for i, role in sides if role == "shadow") == sorted(expected)
    assert sorted(i for i, role in sides if role == "primary") == sorted(expected)
    assert bench._answers_from(settings, "s") == 0
