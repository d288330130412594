"""`sluice dlq replay` re-drives dead-lettered requests after a fix, once."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from pipeline.client import Client
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import init_demo
from pipeline.ops.dlq import replay
from tests.integration.conftest import demo_request, make_settings


@pytest.mark.parametrize("engine", ["batch", "faust"])
def test_replay_after_the_missing_model_is_added(
    engine: str, bootstrap: str, tmp_path, start_workers
) -> None:
    models = tmp_path / "models"
    init_demo(models)
    settings = make_settings(bootstrap, models, engine=engine)
    ensure_topics(settings, pipeline_topics(settings, ["demo", "later"]))
    with Client(settings) as client:
        workers = start_workers(settings, "fused")
        workers.wait_ready(client)
        early = [client.submit(demo_request(f"later-{i}", model="later")) for i in range(20)]
        good = [client.submit(demo_request(f"ok-{i}")) for i in range(5)]
        client.flush()
        assert {f.result(timeout=60).error.code for f in early} == {"unknown_model"}
        assert {f.result(timeout=60).status for f in good} == {"ok"}

        # The fix: the model is deployed, the worker restarted.
        workers.stop()
        shutil.copytree(models / "demo", models / "later")
        start_workers(settings, "fused").wait_ready(client)

        dry = replay(settings, {"unknown_model"}, dry_run=True)
        assert dry["replayed"] == 20 and dry["dry_run"]
        futures = [client.expect(f"later-{i}") for i in range(20)]
        env = {**os.environ, **settings.to_env()}
        out = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "dlq", "replay", "--reason", "unknown_model"],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads(out.stdout.strip().splitlines()[-1])
        assert summary["replayed"] == 20 and summary["by_reason"] == {"unknown_model": 20}
        responses = [f.result(timeout=60) for f in futures]
        assert {r.status for r in responses} == {"ok"}
        assert {r.model for r in responses} == {"later"}

    # A second replay finds nothing new: the first committed its progress.
    again = replay(settings, {"unknown_model"})
    assert again["replayed"] == 0


def test_replay_refuses_a_truncated_record_and_says_why(bootstrap: str, model_dir) -> None:
    from confluent_kafka import Producer

    from pipeline.kafka import producer_config
    from pipeline.ops.dlq import TRUNCATED_WHY
    from pipeline.protocol import codec

    settings = make_settings(bootstrap, model_dir)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    error = codec.RequestError(codec.OVERSIZE, "too large")
    whole = codec.dlq_record(b"small", settings.requests_topic, 0, 1, "gateway", error)
    cut = codec.dlq_record(b" " * 200_000, settings.requests_topic, 0, 2, "gateway", error,
                           max_bytes=50_000)  # fmt: skip
    producer = Producer(producer_config(settings))
    for value in (whole, cut):
        producer.produce(settings.dlq_topic, value)
    assert producer.flush(30) == 0

    summary = replay(settings, dry_run=True)
    assert (summary["read"], summary["replayed"], summary["truncated"]) == (2, 1, 1)
    [refused] = summary["refused"]
    assert refused["original_size"] == 200_000 and refused["why"] == TRUNCATED_WHY
    env = {**os.environ, **settings.to_env()}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "dlq", "replay"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["replayed"] == 1
    assert "refused 1 truncated record(s)" in out.stderr
