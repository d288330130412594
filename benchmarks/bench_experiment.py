"""``sluice bench --scenario experiment``: a live experiment on the demo model, end to end.

1. **Split and shadow.** ``a`` (version 2) at 90 % and ``b`` (version 1) at 10 %, with a
   shadow ``s`` (version 1) mirroring 20 % of the traffic. ``requests`` requests over
   `KEYS` keys go through a fused worker. ``share_error``: the largest gap between a
   variant's measured share and its weight.
2. **Sticky across a restart.** The worker is stopped and a new one started; a key seen in
   part 1 must be served by the same variant. ``sticky_violations``: keys served by two.
3. **The shadow answers nobody.** ``shadow_answers``: answers from ``s`` on the responses
   topic (0). ``shadow_records``: records ``s`` wrote on the shadow topic, against
   ``mirrored``, the requests the routing mirrors.
4. **Rollback.** The config is edited while the worker runs: a canary ``c`` (version 3, a
   handler that sleeps `SLOW_S` a batch) at 10 %, guarded against ``a``, under a light load
   (`CANARY_RATE`). ``rollback_s``: from the first answer ``c`` gave to the rollback event on
   the experiments topic.

The last line is JSON.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from benchmarks.harness import TopicReader, Workers, demo_request
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.experiments import load, mirrored, routing_key
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import init_demo
from pipeline.protocol import codec

KEYS = 5000
SLOW_S = 0.04  # the canary's sleep per batch
# The load while the canary runs: light enough that its sleeps (10 % of it, 40 ms a batch)
# leave the worker idle more than half the time.
CANARY_RATE = 100.0

SPLIT = {
    "variants": [
        {"name": "a", "version": "2", "weight": 90},
        {"name": "b", "version": "1", "weight": 10},
    ],
    "shadow": {"name": "s", "version": "1", "share": 0.2},
}
CANARY = {
    "variants": [
        {"name": "a", "version": "2", "weight": 90},
        {"name": "c", "version": "3", "weight": 10},
    ],
    # On one CPU worker the canary's slow batches hold up the baseline's requests queued
    # behind them, so the medians tell the two apart better than the tails.
    "guard": {"canary": "c", "baseline": "a", "window_s": 10, "min_requests": 30,
              "max_error_rate_delta": 0.05, "max_p99_ratio": 2.0, "max_p99_delta_ms": 20,
              "max_p50_ratio": 2.0, "max_p50_delta_ms": 10},
}  # fmt: skip

SLOW_HANDLER = '''
import time

import numpy as np

from pipeline import Handler


class Slow(Handler):
    """The demo's inputs and outputs, {delay} s slower a batch: a canary gone wrong."""

    def load(self, path, device, config):
        self.weights = np.linspace(-1.0, 1.0, 64, dtype=np.float32).reshape(16, 4)

    def preprocess(self, requests):
        return np.stack([np.asarray(r["features"], dtype=np.float32) for r in requests])

    def predict(self, x):
        time.sleep({delay})
        return x @ self.weights

    def postprocess(self, outputs, n):
        return {{"logits": outputs.astype(np.float32)}}
'''


def write_slow_version(model_dir: Path, version: str = "3", delay_s: float = SLOW_S) -> None:
    """A version of the demo model that answers like it, ``delay_s`` slower a batch."""
    path = model_dir / "demo" / version
    path.mkdir(parents=True, exist_ok=True)
    (path / "slow.py").write_text(SLOW_HANDLER.format(delay=delay_s))
    config = json.loads((model_dir / "demo" / "1" / "config.json").read_text())
    config = {k: config[k] for k in ("inputs", "outputs", "labels")}
    (path / "config.json").write_text(
        json.dumps({"format": "handler", "handler": "slow:Slow", **config}, indent=2)
    )


def write_experiment(model_dir: Path, config: dict[str, Any], model: str = "demo") -> None:
    """Write ``experiment.json`` whole (rename), so a worker never reads half of it."""
    path = model_dir / model / "experiment.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(config, indent=2))
    tmp.replace(path)


def send(
    client: Client, n: int, rate: float, prefix: str, keys: int = KEYS
) -> list[tuple[str, str, Future[codec.Response]]]:
    """``n`` demo requests at ``rate``, request i keyed ``k<i mod keys>``: (id, key, future)."""
    sent = []
    start = time.monotonic()
    for i in range(n):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        request_id, key = f"{prefix}{i}", f"k{i % keys}"
        sent.append((request_id, key, client.submit(demo_request(request_id, key=key))))
    client.flush()
    return sent


def answers(
    sent: list[tuple[str, str, Future[codec.Response]]], timeout_s: float = 120.0
) -> dict[str, codec.Response]:
    deadline = time.monotonic() + timeout_s
    out = {}
    for request_id, _, future in sent:
        with contextlib.suppress(Exception):
            out[request_id] = future.result(timeout=max(0.1, deadline - time.monotonic()))
    return out


def run(
    settings: Settings,
    requests: int = 20_000,
    rate: float | None = None,
    progress: bool = True,
    work: Path | None = None,
) -> dict[str, Any]:
    """The four parts above against ``settings``' broker (a local one if none is set)."""
    from pipeline.ops.broker import LocalBroker

    rate = rate or 2000.0
    work = work or Path(tempfile.mkdtemp(prefix="sluice-experiment-"))
    local = None
    if not settings.bootstrap:
        local = LocalBroker(work / "kafka", settings.cache_dir)
        settings = settings.replace(bootstrap=local.start().bootstrap)
    try:
        return _run(settings, requests, rate, progress, work)
    finally:
        if local is not None:
            local.stop()


def _run(
    settings: Settings, requests: int, rate: float, progress: bool, work: Path
) -> dict[str, Any]:
    models = work / "models"
    init_demo(models)
    write_slow_version(models)
    write_experiment(models, SPLIT)
    settings = settings.replace(model_dir=models, experiment_reload_s=0.5)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    experiment = load("demo", models / "demo" / "experiment.json", ["1", "2", "3"])
    say = print if progress else (lambda *_: None)
    result: dict[str, Any] = {"scenario": "experiment", "requests": requests}

    with Client(settings) as client:
        # 1. The split and the shadow.
        workers = Workers(settings, "fused", work / "logs" / "w0").start()
        try:
            workers.wait_ready(client)
            sent = send(client, requests, rate, "x-")
            got = answers(sent)
        finally:
            workers.stop()
        variants = Counter(r.variant for r in got.values())
        weights = {v.name: v.weight for v in experiment.variants}
        result["answered"] = len(got)
        result["shares"] = {v: round(c / max(1, len(got)), 4) for v, c in sorted(variants.items())}
        result["share_error"] = round(
            max(abs(variants.get(v, 0) / max(1, len(got)) - w) for v, w in weights.items()), 4
        )
        say(f"split: {dict(variants)} of {len(got)}")

        # 2. Sticky across a restart: the same keys through a new worker.
        first = {key: got[rid].variant for rid, key, _ in sent if rid in got}
        workers = Workers(settings.replace(worker_id="1"), "fused", work / "logs" / "w1").start()
        try:
            workers.wait_ready(client)
            again = answers(send(client, min(requests, 2 * KEYS), rate, "y-"))
            resent = [(f"y-{i}", f"k{i % KEYS}") for i in range(min(requests, 2 * KEYS))]
            result["sticky_violations"] = len({
                key for rid, key in resent
                if rid in again and key in first and again[rid].variant != first[key]
            })  # fmt: skip
            result["sticky_checked"] = sum(rid in again for rid, _ in resent)

            # 3. The shadow: what it wrote, and that it answered nobody.
            ids = [rid for rid, _, _ in sent]
            keys = [key for _, key, _ in sent]
            expected = {i for i, k in zip(ids, keys, strict=True)
                        if mirrored(experiment, routing_key(k, i))}  # fmt: skip
            result["mirrored"] = len(expected)
            sides = _shadow_sides(settings, len(expected))
            result["shadow_records"] = sum(1 for i, role in sides if role == "shadow" and
                                           i.startswith("x-"))  # fmt: skip
            result["shadow_missing"] = len(expected - {i for i, role in sides if role == "shadow"})
            result["shadow_answers"] = _answers_from(settings, "s")
            say(f"shadow: {result['shadow_records']} of {len(expected)} mirrored")

            # 4. A slow canary, rolled back by the guard.
            write_experiment(models, CANARY)
            result.update(_rollback(settings, client, CANARY_RATE))
            say(f"rollback after {result['rollback_s']} s")
        finally:
            workers.stop()
    return result


def _shadow_sides(settings: Settings, expected: int) -> list[tuple[str, str]]:
    """(request id, role) of every record on the shadow topic."""
    sides: list[tuple[str, str]] = []
    with TopicReader(settings, settings.shadow_topic) as reader:
        reader.read_until(lambda: sum(1 for r in reader.records) >= 2 * expected, 60)
        for r in reader.records:
            record = json.loads(r.value or b"{}")
            sides.append((record.get("id", ""), record.get("role", "")))
    return sides


def _answers_from(settings: Settings, variant: str) -> int:
    """Answers on the responses topic from ``variant``."""
    with TopicReader(settings, settings.responses_topic) as reader:
        reader.read_until(lambda: False, 5, idle_s=1.0)
        return sum(
            1 for r in reader.records if codec.decode_response(r.value or b"").variant == variant
        )


def _rollback(settings: Settings, client: Client, rate: float) -> dict[str, Any]:
    """Paced load until the canary is rolled back (at most 60 s): when its first answer
    came, and when the rollback event was published."""
    first_canary: float | None = None
    sent: list[Future[codec.Response]] = []
    start = time.monotonic()
    event: dict[str, Any] | None = None
    with TopicReader(settings, settings.experiment_events_topic) as events:
        i = 0
        while time.monotonic() - start < 60 and event is None:
            # Evenly paced (not in bursts, which would queue every burst behind the canary).
            tick = time.monotonic() + 0.1
            while (now := time.monotonic()) < tick:
                if now >= start + i / rate:
                    sent.append(client.submit(demo_request(f"z-{i}", key=f"k{i % KEYS}")))
                    i += 1
                time.sleep(min(0.002, max(0.0, start + i / rate - time.monotonic())))
            if first_canary is None:
                for f in sent[-500:]:
                    if f.done() and f.exception() is None and f.result().variant == "c":
                        first_canary = time.time()
                        break
            events._poll(0.0, None)
            for r in events.records:
                candidate = json.loads(r.value or b"{}")
                if candidate.get("type") == "rollback":
                    event = candidate
        event_ts = time.time()
    # Sent after the rollback: none may reach the canary.
    after = [client.submit(demo_request(f"after-{j}", key=f"k{j}")) for j in range(200)]
    client.flush()
    late = [f.result(timeout=60) for f in after]
    for f in sent:
        f.result(timeout=60)  # every request of the run answered
    return {
        "rollback_s": round(event_ts - first_canary, 2) if event and first_canary else None,
        "rollback_reason": event.get("reason") if event else None,
        "canary_answers_after": sum(r.variant == "c" for r in late),
        "rollback_sent": len(sent),
    }
