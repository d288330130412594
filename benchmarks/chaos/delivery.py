"""Delivery under process and broker faults: a kill loop, a broker restart, a rolling
update (SIGTERM), and one of three workers killed in a consumer group."""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient

from benchmarks import bench
from benchmarks.chaos.common import (
    RssSampler,
    answers,
    duplicates,
    prepare,
    responses_by_key,
    running,
    summary,
    topic_count,
    under_fault,
)
from benchmarks.harness import PacedSender, TopicReader, Workers
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.kafka import confluent_config
from pipeline.models import init_demo
from pipeline.ops import procs
from pipeline.ops.broker import LocalBroker, free_port

# -- crash ----------------------------------------------------------------------------------


# How long a restarted worker may take to answer its first request.
SERVE_WAIT_S = 120.0


def crash(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    rate: float = 1000.0,
    kill_every_s: float = 10.0,
) -> dict[str, Any]:
    """A fused worker killed with SIGKILL during a paced run (about every ``kill_every_s``
    of sending, at least twice, each time once it serves) and restarted right after each
    kill: every request must be answered.

    At-least-once may publish a response more than once (``duplicates_seen``, by a
    read_committed reader), and the client resolves each id once (``client_resolved_once``);
    exactly-once publishes each once as a read_committed reader sees it.
    ``duration_s`` (if given) sets the request count at ``rate``.
    """
    n = requests or (int(rate * duration_s) if duration_s else 100_000)
    # A short session: a killed worker leaves the group (and its partitions move) sooner.
    settings = prepare(settings, "crash", work, session_timeout_ms=6000)
    resolved: Counter[str] = Counter()
    kills: list[tuple[float, int]] = []  # (seconds into the run, requests answered by then)
    unexpected = 0
    dead_logs: list[str] = []  # the log tails of workers that died by themselves

    def count(future: Future) -> None:  # type: ignore[type-arg]
        if not future.cancelled() and future.exception() is None:
            resolved[future.result().id] += 1

    current = [Workers(settings, "fused", work / "logs" / "w0")]
    with Client(settings) as client, RssSampler(lambda: [p.pid for p in current[0].procs]) as rss:
        try:
            current[0].start().wait_ready(client)
            sender = PacedSender(client, n, rate, on_future=lambda f: f.add_done_callback(count))
            start = time.monotonic()
            sender.start()
            try:
                # Kills come at even shares of the requests sent (not of wall time), at
                # least two, each once the worker it hits has served: on a busy machine a
                # restart can take longer than a kill interval, and a kill timed by the
                # clock could hit a worker still starting, which would test nothing.
                wanted = max(2, round(n / (rate * kill_every_s)) - 1)
                for k in range(1, wanted + 1):
                    threshold = n * k // (wanted + 1)
                    while len(sender.futures) < threshold and sender.is_alive():
                        sender.join(timeout=0.1)
                    if not current[0].alive():
                        unexpected += 1
                        dead_logs.append(current[0].logs()[-3000:])
                    current[0].kill()
                    kills.append((round(time.monotonic() - start, 1), len(resolved)))
                    current[0] = Workers(settings, "fused", work / "logs" / f"w{len(kills)}")
                    try:
                        current[0].start().wait_ready(client, SERVE_WAIT_S)
                    except RuntimeError as exc:  # exited (counted above next turn) or stuck
                        if current[0].alive():
                            unexpected += 1
                            dead_logs.append(str(exc)[-3000:])
            finally:
                sender.join(timeout=120)
            responses = answers(sender.futures, 240)
            answered_s = time.monotonic() - start
            if not current[0].alive():
                unexpected += 1
                dead_logs.append(current[0].logs()[-3000:])
        finally:
            current[0].stop()
    answered = sum(r is not None for r in responses)
    served = [k for _, k in kills]
    committed = responses_by_key(settings, b"r-", n, "read_committed")
    uncommitted = responses_by_key(settings, b"r-", n, "read_uncommitted")
    return {
        **summary(
            len(sender.futures),
            answered,
            n - answered,
            duplicates(committed),
            topic_count(settings, settings.dlq_topic),
            len(kills),
            unexpected,
            rss.max_mb,
        ),
        "delivery": settings.delivery,
        "rate_rps": rate,
        "ids_mismatched": sum(r is not None and r.id != f"r-{i}" for i, r in enumerate(responses)),
        "outcomes": dict(Counter(r.status for r in responses if r is not None)),
        "client_resolved_once": len(resolved) == n and set(resolved.values()) == {1},
        "responses_committed": len(committed),
        "duplicates_uncommitted": duplicates(uncommitted),
        "kills": kills,
        # Each kill hit a worker that had been serving: answers kept coming between kills.
        "answers_between_kills": all(b > a for a, b in zip([0, *served], served, strict=False)),
        "answered_s": round(answered_s, 1),
        **({"unexpected_exit_logs": dead_logs} if dead_logs else {}),
    }


# -- broker restart -------------------------------------------------------------------------


def broker_restart(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    rate: float = 300.0,
    down_after_s: float = 3.0,
    down_for_s: float = 3.0,
) -> dict[str, Any]:
    """A broker of the run's own stops in the middle of a paced run and comes back on the
    same port and data: the worker and the client reconnect by themselves."""
    n = requests or (int(rate * duration_s) if duration_s else 6000)
    broker = LocalBroker(work / "kafka-restart", settings.cache_dir)
    port = free_port()
    broker.start(port=port)
    seen: dict[str, Any] = {}

    def fault(sender: PacedSender, _workers: Workers) -> list[tuple[float, str]]:
        time.sleep(down_after_s)
        at = time.monotonic()
        seen["broker_stopped"] = broker.stop()
        seen["stopped_at"] = len(sender.futures)
        time.sleep(down_for_s)
        seen["same_port"] = broker.start(port=port).port == port
        seen["restarted_at"] = len(sender.futures)
        return [(at, f"stopped the broker for {down_for_s:g} s")]

    try:
        settings = prepare(settings.replace(bootstrap=f"127.0.0.1:{port}"), "restart", work)
        result = {**under_fault(settings, work, n, rate, fault), **seen}
        if result["lost"]:
            result["broker_log_tail"] = broker.log_tail(40)
        return result
    finally:
        broker.stop()


# -- rolling update -------------------------------------------------------------------------


def rolling_update(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    rate: float = 300.0,
    updates: int = 2,
) -> dict[str, Any]:
    """Kubernetes' rolling update of a one-replica Deployment (maxSurge 1, maxUnavailable
    0), ``updates`` times under a paced load: a new worker starts and joins the group, then
    the old one gets SIGTERM, drains, commits and exits by itself.

    Nothing may be lost. The old worker answers what it holds and commits before its
    partitions move, so even at-least-once should answer nothing twice. ``shutdown_s``: the
    longest SIGTERM-to-exit; ``exit_codes``: the old workers' (0 for a clean shutdown).
    """
    n = requests or (int(rate * duration_s) if duration_s else 6000)
    settings = prepare(settings, "rolling-update", work)
    group, topic = settings.group_id("fused"), settings.requests_topic
    admin = AdminClient(confluent_config(settings))
    seen: dict[str, Any] = {"shutdown_s": [], "exit_codes": []}

    def fault(sender: PacedSender, workers: Workers) -> list[tuple[float, str]]:
        done = []
        for update in range(1, updates + 1):
            while len(sender.futures) < n * update // (updates + 1) and sender.is_alive():
                time.sleep(0.05)
            surge = Workers(settings.replace(worker_id=str(update)), "fused",
                            work / "logs" / f"w{update}").start()  # fmt: skip
            _wait_group(admin, group, topic, 2, timeout_s=SERVE_WAIT_S)
            old, at = workers.procs, time.monotonic()
            procs.stop(old, timeout_s=settings.shutdown_timeout_s + 10)
            seen["shutdown_s"].append(round(time.monotonic() - at, 2))
            seen["exit_codes"] += [p.returncode for p in old]
            workers.procs, workers.log_dir = surge.procs, surge.log_dir
            done.append((at, f"update {update}: SIGTERM to the old worker"))
        return done

    return {**under_fault(settings, work, n, rate, fault), **seen}


# -- scale-out ------------------------------------------------------------------------------


def _assignment(admin: AdminClient, group: str, topic: str) -> tuple[str, dict[str, list[int]]]:
    """The group's state and each member's partitions of ``topic``."""
    description = admin.describe_consumer_groups([group])[group].result(timeout=10)
    members = {}
    for m in description.members:
        parts = m.assignment.topic_partitions
        members[m.member_id] = sorted(tp.partition for tp in parts if tp.topic == topic)
    return str(description.state), members


def _wait_group(
    admin: AdminClient, group: str, topic: str, members: int, timeout_s: float = 60.0
) -> dict[str, list[int]]:
    """Wait until ``members`` consumers share the group, stable; their assignments."""
    deadline = time.monotonic() + timeout_s
    while True:
        state, assignment = _assignment(admin, group, topic)
        if len(assignment) == members and state.endswith("STABLE"):
            return assignment
        if time.monotonic() > deadline:
            raise RuntimeError(f"group {group} has {assignment} ({state}), not {members} members")
        time.sleep(0.2)


def scale_out(
    settings: Settings,
    work: Path,
    requests: int | None = None,
    duration_s: float | None = None,
    rate: float = 500.0,
    partitions: int = 6,
    burst: int = 50_000,
) -> dict[str, Any]:
    """Three worker processes in one consumer group under a steady paced load (``requests``,
    or ``duration_s`` at ``rate``; default 30 s); one is killed with SIGKILL a third of the
    way in and not restarted: its partitions move to the survivors, nothing is lost.

    ``rebalance_s`` is the time from the kill until a survivor answers a request sent after
    the kill to one of the killed worker's partitions. ``throughput_rps`` comes from bursts
    of ``burst`` requests through 1, 2 and 3 processes (`benchmarks.bench`).
    """
    n = requests or int(rate * (duration_s or 30.0))
    # A short session: the killed worker leaves the group sooner.
    settings = settings.replace(partitions=partitions, session_timeout_ms=6000)
    if settings.model_dir is None:
        settings = settings.replace(model_dir=work / "models")
    init_demo(settings.models_path)
    throughput: dict[str, float] = {}
    burst_lost = 0
    for count in (1, 2, 3):
        log_dir = work / "logs" / f"bench-{count}"
        burst_summary = bench.run(
            settings,
            "fused",
            burst,
            None,
            progress=False,
            log_dir=log_dir,
            workers=count,
            partitions=partitions,
        )
        throughput[str(count)] = burst_summary["throughput_rps"]
        burst_lost += burst_summary["sent"] - burst_summary["answered"]

    settings = prepare(settings, "scale-out", work)
    group, topic = settings.group_id("fused"), settings.requests_topic
    admin = AdminClient(confluent_config(settings))
    answered_at: dict[str, float] = {}

    def stamp(future: Future) -> None:  # type: ignore[type-arg]
        if not future.cancelled() and future.exception() is None:
            answered_at[future.result().id] = time.monotonic()

    workers = Workers(settings, "fused", work / "logs" / "group", count=3)
    with (
        Client(settings) as client,
        running(workers.start()),
        RssSampler(lambda: [p.pid for p in workers.procs if p.poll() is None]) as rss,
    ):
        workers.wait_ready(client)
        before = _wait_group(admin, group, topic, 3)
        sender = PacedSender(client, n, rate, on_future=lambda f: f.add_done_callback(stamp))
        sender.start()
        try:
            time.sleep(n / rate / 3)
            victim = workers.procs[1]
            unexpected = sum(p.poll() is not None for p in workers.procs)
            procs.kill([victim])
            killed_at, killed_index = time.monotonic(), len(sender.futures)
            after = _wait_group(admin, group, topic, 2)
        finally:
            sender.join(timeout=max(120.0, 2 * n / rate))
        responses = answers(sender.futures, 120)
        unexpected += sum(p.poll() is not None for p in workers.procs if p is not victim)
    moved = next((parts for member, parts in before.items() if member not in after), [])
    # Which partition each request went to, as the broker has it.
    partition_of: dict[str, int] = {}
    with TopicReader(settings, topic, keep=False) as reader:

        def on_request(read: Any) -> None:
            if read.key is not None and read.key.startswith(b"r-"):
                partition_of[read.key.decode()] = read.partition

        reader.read_until(lambda: len(partition_of) >= n, 60, on_request)
    after_kill = [
        answered_at[f"r-{i}"]
        for i in range(killed_index, len(sender.futures))
        if partition_of.get(f"r-{i}") in moved and f"r-{i}" in answered_at
    ]
    answered = sum(r is not None for r in responses)
    committed = responses_by_key(settings, b"r-", n, "read_committed", 120)
    covered = sorted(p for parts in after.values() for p in parts)
    return {
        **summary(
            len(sender.futures),
            answered,
            n - answered + burst_lost,
            duplicates(committed),
            topic_count(settings, settings.dlq_topic),
            1,
            unexpected,
            rss.max_mb,
        ),
        "rate_rps": rate,
        "partitions": partitions,
        "assignment_before": sorted(before.values()),
        "assignment_after": sorted(after.values()),
        "moved_partitions": moved,
        "survivors_cover_all": covered == list(range(partitions)),
        "answered_after_kill_on_moved": len(after_kill),
        "rebalance_s": round(min(after_kill) - killed_at, 2) if after_kill else None,
        "ids_mismatched": sum(r is not None and r.id != f"r-{i}" for i, r in enumerate(responses)),
        "outcomes": dict(Counter(r.status for r in responses if r is not None)),
        "throughput_requests": burst,
        "throughput_rps": throughput,
        "throughput_lost": burst_lost,
    }
