"""The broker stops in the middle of a run and comes back on the same port and data: the
worker and the client reconnect by themselves, and every request is answered."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.broker import LocalBroker, free_port
from pipeline.client import Client
from pipeline.config import default_cache_dir
from pipeline.kafka import ensure_topics, pipeline_topics
from tests.integration.conftest import PacedSender, make_settings

N = 3000
RATE = 300.0
DOWN_AFTER_S = 3.0
DOWN_FOR_S = 3.0


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[tuple[LocalBroker, int]]:
    """A broker of this test's own (the session's must stay up), on a port fixed for restarts.

    Requested before ``start_workers``, so it is stopped after the workers are.
    """
    cache = Path(os.environ.get("SLUICE_CACHE_DIR") or default_cache_dir())
    broker = LocalBroker(tmp_path / "kafka", cache)
    port = free_port()
    broker.start(port=port)
    try:
        yield broker, port
    finally:
        broker.stop()


def test_broker_restart_mid_run_loses_nothing(
    own_broker: tuple[LocalBroker, int], model_dir: Path, start_workers
) -> None:
    broker, port = own_broker
    settings = make_settings(f"127.0.0.1:{port}", model_dir)
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    with Client(settings) as client:
        workers = start_workers(settings, "fused")
        workers.wait_ready(client)
        # Produced into librdkafka's queue while the broker is away, sent once it is back.
        sender = PacedSender(client, N, RATE, flush=False)
        futures = sender.futures
        sender.start()
        try:
            time.sleep(DOWN_AFTER_S)
            assert broker.stop(), "the broker was not running"
            stopped_at = len(futures)
            time.sleep(DOWN_FOR_S)
            assert broker.start(port=port).port == port
            restarted_at = len(futures)
        finally:
            sender.join(timeout=60)
        assert not sender.is_alive()
        assert 0 < stopped_at < restarted_at < N, (stopped_at, restarted_at)
        client.flush(120)
        try:
            responses = [f.result(timeout=120) for f in futures]
        except Exception:
            print(f"broker log:\n{broker.log_tail(80)}")
            raise
        assert workers.alive(), f"worker exited:\n{workers.logs()}"
    assert [r.id for r in responses] == [f"r-{i}" for i in range(N)]
    assert {r.status for r in responses} == {"ok"}
    print(f"broker down from request {stopped_at} to {restarted_at} of {N}")
