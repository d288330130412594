"""Delivery on a three-broker cluster that loses brokers: the leader of the requests
partition killed (SIGKILL) mid-run and brought back, and every broker restarted in turn
under load. Nothing may be lost; under exactly-once a read_committed reader sees no
duplicate. ``recovery_s``: from the fault until the last answer it delayed arrived
(`Timeline.recovery_s`)."""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.chaos.common import (
    RssSampler,
    Timeline,
    answers,
    duplicates,
    prepare,
    responses_by_key,
    running,
    summary,
    topic_count,
)
from benchmarks.harness import PacedSender, Workers
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.ops.broker.cluster import LocalCluster


def _run(
    settings: Settings,
    work: Path,
    scenario: str,
    n: int,
    rate: float,
    fault: Any,
) -> dict[str, Any]:
    """A fused worker served from a cluster of three while ``fault(cluster, settings)``
    runs in the middle of a paced run; returns the scenario's summary."""
    cluster = LocalCluster(work / "cluster", settings.cache_dir, brokers=3)
    bootstrap = cluster.start()
    try:
        settings = prepare(settings.replace(bootstrap=bootstrap), scenario, work,
                           session_timeout_ms=10_000)  # fmt: skip
        workers = Workers(settings, "fused", work / "logs" / "w0")
        timeline = Timeline()
        with (
            Client(settings) as client,
            running(workers.start()),
            RssSampler(lambda: [p.pid for p in workers.procs]) as rss,
        ):
            workers.wait_ready(client)
            sender = PacedSender(client, n, rate, on_future=timeline.track, flush=False)
            sender.start()
            try:
                faults = fault(cluster, settings)
            finally:
                sender.join(timeout=120)
            with contextlib.suppress(TimeoutError):
                client.flush(120)
            responses = answers(sender.futures, 180)
            alive = workers.alive()
        answered = sum(r is not None for r in responses)
        committed = responses_by_key(settings, b"r-", n, "read_committed", 60)
        result = {
            **summary(
                len(sender.futures),
                answered,
                n - answered,
                duplicates(committed),
                topic_count(settings, settings.dlq_topic),
                0,
                int(not alive),
                rss.max_mb,
            ),  # fmt: skip
            "brokers": len(cluster.nodes),
            "delivery": settings.delivery,
            "recovery_s": max(timeline.recovery_s(at) for at, _ in faults),
            "faults": [what for _, what in faults],
            "outcomes": dict(Counter(r.status for r in responses if r is not None)),
        }
        if result["lost"]:
            result["broker_log_tail"] = cluster.log_tail(20)
        return result
    finally:
        cluster.stop()


def leader_kill(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    rate: float = 200.0,
    kill_after_s: float = 4.0,
    down_for_s: float = 5.0,
) -> dict[str, Any]:
    """The broker that leads the requests topic's partition 0 is killed with SIGKILL (under
    exactly-once, the transaction coordinator too, if another broker is it), and started
    again ``down_for_s`` later."""
    n = requests or (int(rate * duration_s) if duration_s else 4000)

    def fault(cluster: LocalCluster, s: Settings) -> list[tuple[float, str]]:
        time.sleep(kill_after_s)
        victims = [cluster.leader_of(s.requests_topic, 0)]
        if s.delivery == "exactly_once":
            coordinator = cluster.leader_of("__transaction_state", 0)
            victims += [coordinator] if coordinator not in victims else []
        done = []
        for victim in victims:
            at = time.monotonic()
            cluster.kill(victim)
            time.sleep(down_for_s)
            cluster.restart(victim, graceful=False)
            done.append((at, f"killed node {victim} for {down_for_s:g} s"))
        return done

    return _run(settings, work, "leader-kill", n, rate, fault)


def rolling_restart(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    rate: float = 200.0,
    first_after_s: float = 3.0,
) -> dict[str, Any]:
    """Every broker restarted in turn (SIGTERM, a controlled shutdown), each once the one
    before is back and every partition is in sync again, under a paced load."""
    n = requests or (int(rate * duration_s) if duration_s else 6000)

    def fault(cluster: LocalCluster, s: Settings) -> list[tuple[float, str]]:
        time.sleep(first_after_s)
        done = []
        for node in cluster.nodes:
            at = time.monotonic()
            cluster.restart(node, graceful=True)
            done.append((at, f"restarted node {node}"))
        return done

    return _run(settings, work, "rolling-restart", n, rate, fault)
