"""Delivery on a three-broker cluster that loses brokers: the leader of the requests
partition killed (SIGKILL) mid-run and brought back, and every broker restarted in turn
under load. Nothing may be lost; under exactly-once a read_committed reader sees no
duplicate. ``recovery_s``: from the fault until the last answer it delayed arrived
(`Timeline.recovery_s`)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.chaos.common import prepare, under_fault
from pipeline.config import Settings
from pipeline.ops.broker.cluster import LocalCluster


def _run(
    settings: Settings,
    work: Path,
    scenario: str,
    n: int,
    rate: float,
    fault: Callable[[LocalCluster, Settings], list[tuple[float, str]]],
) -> dict[str, Any]:
    """A fused worker served from a cluster of three while ``fault(cluster, settings)``
    runs in the middle of a paced run; returns the scenario's summary."""
    cluster = LocalCluster(work / "cluster", settings.cache_dir, brokers=3)
    bootstrap = cluster.start()
    try:
        # The consumer's session outlives a group coordinator's failover (the broker's
        # session timeout, 9 s, then an election and the group's reload): at sluice's
        # 10 s the member expires meanwhile, and under exactly-once its transaction's
        # offsets are refused (UNKNOWN_MEMBER_ID), which ends the worker.
        settings = prepare(settings.replace(bootstrap=bootstrap), scenario, work,
                           session_timeout_ms=30_000)  # fmt: skip
        result = under_fault(settings, work, n, rate, lambda *_: fault(cluster, settings))
        result.update(brokers=len(cluster.nodes), delivery=str(settings.delivery))
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
