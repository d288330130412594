"""Experiments wired into the serving layer, without Kafka: the variant each request gets and
each answer names, the shadow's copy and its records, the rollback and its event, another
worker's rollback applied, and a bad edit refused with the config in force kept."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from pipeline.experiments import load, mirrored, routing_key
from pipeline.experiments.live import LiveExperiments
from pipeline.protocol import codec
from pipeline.serving import Job
from tests.unit.serving.test_stages import Env, make_env, origin, request

SPLIT = {
    "variants": [
        {"name": "a", "version": "2", "weight": 90},
        {"name": "b", "version": "1", "weight": 10},
    ],
    "shadow": {"name": "s", "version": "1", "share": 0.5},
}
GUARDED = {
    "variants": [
        {"name": "a", "version": "2", "weight": 50},
        {"name": "b", "version": "1", "weight": 50},
    ],
    "guard": {"canary": "b", "baseline": "a", "window_s": 60, "min_requests": 5,
              "max_error_rate_delta": 0.1},
}  # fmt: skip


class FakeLog:
    def __init__(self) -> None:
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.incoming: list[dict[str, Any]] = []

    def publish(self, model: str, event: dict[str, Any]) -> None:
        self.published.append((model, event))

    def poll(self) -> list[dict[str, Any]]:
        events, self.incoming = self.incoming, []
        return events

    def close(self) -> None:
        pass


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def setup(demo_dir: Path, tmp_path: Path, config: dict[str, Any]) -> tuple[Env, FakeLog, Clock]:
    models = tmp_path / "models"
    shutil.copytree(demo_dir, models)
    (models / "demo" / "experiment.json").write_text(json.dumps(config))
    env = make_env(models, tmp_path)
    events, clock = FakeLog(), Clock()
    env.pipeline.experiments = LiveExperiments(
        env.settings, models, env.registry.versions, lambda: env.registry.names,
        env.metrics, clock, events=lambda: events,
    )  # fmt: skip
    return env, events, clock


def admit(env: Env, n: int, prefix: str = "r") -> list[Job]:
    admitted = env.pipeline.admit_many(
        [origin(request(f"{prefix}{i}", seed=i, key=f"k{i}"), offset=i) for i in range(n)]
    )
    assert all(isinstance(a, Job) for a in admitted)
    return [a for a in admitted if isinstance(a, Job)]


def test_requests_get_their_variant_and_shadows_a_copy(demo_dir: Path, tmp_path: Path) -> None:
    env, _, _ = setup(demo_dir, tmp_path, SPLIT)
    experiment = load("demo", tmp_path / "models" / "demo" / "experiment.json", ["1", "2"])
    jobs = admit(env, 200)
    versions = {"a": "2", "b": "1"}
    for job in jobs:
        assert job.variant in versions and job.model.version == versions[job.variant]
        copied = mirrored(experiment, routing_key(job.request.key, job.request.id))
        assert (job.mirror is not None) is copied
        if job.mirror is not None:
            assert job.role == "primary" and job.mirror.role == "shadow"
            assert job.mirror.variant == "s" and job.mirror.model.version == "1"
            assert job.mirror.origin.ack is None  # the primary's answer acks the record
    assert 0.3 < sum(j.mirror is not None for j in jobs) / len(jobs) < 0.7
    # A request that names its version bypasses the split (and the shadow).
    [pinned] = env.pipeline.admit_many([origin(request("p", version="1", key="k1"))])
    assert isinstance(pinned, Job) and pinned.variant is None and pinned.mirror is None


def test_answers_name_their_variant_and_the_shadow_answers_nobody(
    demo_dir: Path, tmp_path: Path
) -> None:
    env, _, _ = setup(demo_dir, tmp_path, SPLIT)
    jobs = admit(env, 60)
    mirrors = [j.mirror for j in jobs if j.mirror is not None]
    assert mirrors
    outcomes = env.pipeline.infer(jobs + mirrors)
    publications = env.pipeline.response_records(outcomes, "infer")
    records = [r for _, rs in publications for r in rs]
    answers = [r for r in records if r.topic == env.settings.responses_topic]
    shadow = [r for r in records if r.topic == env.settings.shadow_topic]
    assert len(answers) == len(jobs)  # one each, none from the shadow
    by_id = {j.request.id: j for j in jobs}
    for r in answers:
        response = codec.decode_response(r.value)
        assert response.status == "ok" and response.variant == by_id[response.id].variant
    sides = [codec.decode_shadow(r.value) for r in shadow]
    assert sorted((s.id, s.role) for s in sides) == sorted(
        [(m.request.id, "shadow") for m in mirrors] + [(m.request.id, "primary") for m in mirrors]
    )
    assert all(s.outputs and s.status == "ok" for s in sides)
    assert env.sample("sluice_inflight_requests") == pytest.approx(0.0, abs=1e-9)
    counted = {
        v: env.sample("sluice_requests_total", model="demo", version=ver, outcome="ok", variant=v)
        for v, ver in (("a", "2"), ("b", "1"), ("s", "1"))
    }
    assert counted["a"] + counted["b"] == pytest.approx(len(jobs), abs=1e-9)
    assert counted["s"] == pytest.approx(0.0, abs=1e-9)  # the shadow answers nobody


def test_a_failing_canary_is_rolled_back_and_the_event_published(
    demo_dir: Path, tmp_path: Path
) -> None:
    env, events, clock = setup(demo_dir, tmp_path, GUARDED)
    live = env.pipeline.experiments
    assert live is not None
    for i in range(10):
        live.record("demo", "a", 0.01, ok=True)
        live.record("demo", "b", 0.01, ok=i % 2 == 0)  # half of the canary's fail
    clock.now += 5
    live.tick()
    [(model, event)] = events.published
    assert model == "demo" and event["type"] == "rollback" and event["variant"] == "b"
    assert "error rate" in event["reason"]
    assert env.sample("sluice_experiment_rollbacks_total", model="demo", variant="b") == 1
    assert {j.variant for j in admit(env, 50)} == {"a"}


def test_another_workers_rollback_applies_for_the_same_config_only(
    demo_dir: Path, tmp_path: Path
) -> None:
    env, events, clock = setup(demo_dir, tmp_path, GUARDED)
    live = env.pipeline.experiments
    assert live is not None
    experiment = live.experiment("demo")
    assert experiment is not None
    events.incoming.append({"type": "rollback", "model": "demo", "variant": "b",
                            "fingerprint": "0" * 16})  # another config's  # fmt: skip
    clock.now += 5
    live.tick()
    assert {j.variant for j in admit(env, 50)} == {"a", "b"}
    events.incoming.append({"type": "rollback", "model": "demo", "variant": "b",
                            "fingerprint": experiment.fingerprint})  # fmt: skip
    clock.now += 5
    live.tick()
    assert {j.variant for j in admit(env, 50, "s")} == {"a"}


def test_a_bad_edit_is_refused_and_the_config_in_force_stays(
    demo_dir: Path, tmp_path: Path
) -> None:
    env, _, clock = setup(demo_dir, tmp_path, SPLIT)
    bad = {"variants": [{"name": "a", "version": "7", "weight": 1}]}
    (tmp_path / "models" / "demo" / "experiment.json").write_text(json.dumps(bad))
    clock.now += 5
    assert {j.variant for j in admit(env, 100)} == {"a", "b"}
    assert env.sample("sluice_experiment_config_errors_total", model="demo") == 1
