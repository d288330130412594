"""Stopping (or killing) the worker in the middle of a run loses no request."""

from __future__ import annotations

import threading
import time

import pytest

from pipeline.client import Client
from tests.integration.conftest import demo_request

N = 3000
RATE = 500.0


@pytest.mark.parametrize(
    ("engine", "mode", "how"),
    [
        ("batch", "fused", "stop"),
        ("batch", "fused", "kill"),
        ("batch", "split", "kill"),
        ("faust", "fused", "stop"),
        ("faust", "fused", "kill"),
    ],
)
def test_restart_mid_run_loses_nothing(
    engine: str, mode: str, how: str, settings, client: Client, start_workers
) -> None:
    settings = settings.replace(engine=engine)
    workers = start_workers(settings, mode)
    workers.wait_ready(client)
    futures = []

    def produce() -> None:
        start = time.monotonic()
        for i in range(N):
            delay = start + i / RATE - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            futures.append(client.submit(demo_request(f"r-{i}")))
        client.flush()

    sender = threading.Thread(target=produce)
    sender.start()
    time.sleep(2.0)
    workers.stop() if how == "stop" else workers.kill()
    assert len(futures) < N, "the run ended before the worker was stopped"
    replacement = start_workers(settings, mode)
    sender.join(timeout=60)
    responses = [f.result(timeout=120) for f in futures]
    assert replacement.alive()
    assert len(responses) == N
    assert {r.id for r in responses} == {f"r-{i}" for i in range(N)}
    assert {r.status for r in responses} == {"ok"}
