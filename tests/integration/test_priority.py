"""Requests on the priority topic are served before a backlog on the requests topic."""

from __future__ import annotations

import statistics
import time

from pipeline.client import Client
from tests.integration.conftest import demo_request


def test_priority_requests_overtake_a_backlog(settings, client: Client, start_workers) -> None:
    done: dict[str, float] = {}

    def track(future, request_id: str) -> None:  # type: ignore[no-untyped-def]
        future.add_done_callback(lambda _: done.__setitem__(request_id, time.perf_counter()))

    backlog = 60_000
    for i in range(backlog):
        track(client.submit(demo_request(f"n-{i}")), f"n-{i}")
    client.flush()
    workers = start_workers(settings, "fused")
    deadline = time.monotonic() + 120
    while len(done) < 2_000 and time.monotonic() < deadline:
        assert workers.alive(), workers.logs()
        time.sleep(0.01)
    # The worker is draining the backlog (and has much of it prefetched) when these arrive.
    sent_at = time.perf_counter()
    for i in range(50):
        rid = f"p-{i}"
        track(client.submit(demo_request(rid), topic=settings.priority_topic), rid)
    client.flush()
    while len(done) < backlog + 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(done) == backlog + 50, f"only {len(done)} answered"
    served_at = statistics.median(done[f"p-{i}"] for i in range(50))
    overtaken = sum(1 for i in range(backlog) if sent_at < done[f"n-{i}"] < served_at)
    remaining = sum(1 for i in range(backlog) if done[f"n-{i}"] > sent_at)
    # Without priority they would wait behind most of the remaining backlog.
    assert overtaken < min(5_000, remaining // 4), (overtaken, remaining)
