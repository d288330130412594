"""Stopping (or killing) the worker in the middle of a run loses no request."""

from __future__ import annotations

import time

import pytest

from pipeline.client import Client
from tests.integration.conftest import PacedSender

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
    sender = PacedSender(client, N, RATE)
    futures = sender.futures
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
