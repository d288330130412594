"""Consumer lag: how far each consumer group is behind, in records and in seconds.

Offset lag is a partition's high watermark minus the group's committed offset. Time lag is
the age of the oldest record the group has not consumed: the timestamp of the record at the
committed offset, read with a short-lived consumer (assign + seek, never a group member), or
0 when the offset lag is 0. A partition where the group has committed nothing counts from
its log start offset, where sluice's consumers (``auto.offset.reset=earliest``) begin.

`describe` answers once, for any groups (``sluice lag``);
`pipeline.observability.lag_monitor.LagMonitor` samples a worker's own group on a thread
and exports the results as gauges.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from confluent_kafka import (
    OFFSET_INVALID,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    ConsumerGroupTopicPartitions,
    KafkaException,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, OffsetSpec

from pipeline.config import Settings
from pipeline.kafka import confluent_config

log = logging.getLogger(__name__)
# The group id the time-lag reader gives librdkafka (it requires one); the reader only
# assigns partitions and never commits, so the group never exists on the broker.
READER_GROUP = "sluice-lag-reader"
_REQUEST_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class PartitionLag:
    """One group's position on one partition."""

    group: str
    topic: str
    partition: int
    committed: int | None  # None: the group has committed no offset on this partition
    start: int  # log start offset
    end: int  # high watermark
    lag: int
    time_lag_s: float | None  # None: the record at the group's position could not be read

    @property
    def position(self) -> int:
        """Where the group resumes: its committed offset, or the log start."""
        return consumed_from(self.committed, self.start)


def admin_client(settings: Settings) -> AdminClient:
    return AdminClient(confluent_config(settings))


def list_groups(admin: AdminClient, prefix: str = "") -> list[str]:
    """Ids of the consumer groups on the cluster that start with ``prefix``, sorted."""
    # ListGroups goes to every broker the client knows; a new client may know none yet.
    admin.list_topics(timeout=_REQUEST_TIMEOUT_S)
    result = admin.list_consumer_groups(request_timeout=_REQUEST_TIMEOUT_S).result()
    for error in result.errors:
        log.warning("listing consumer groups: %s", error)
    return sorted(g.group_id for g in result.valid if g.group_id.startswith(prefix))


def describe(
    settings: Settings,
    groups: Sequence[str],
    topics: Sequence[str] | None = None,
    admin: AdminClient | None = None,
    now_s: float | None = None,
    time_lag: bool = True,
) -> list[PartitionLag]:
    """Offset and time lag of ``groups``, sorted by group, topic and partition.

    Args:
        settings: where the cluster is, and its credentials.
        groups: consumer group ids.
        topics: the topics to report on, every partition of them (a worker's own
            subscription); None reports the partitions each group has committed offsets on
            or has assigned to a member, as ``kafka-consumer-groups --describe`` does.
        admin: an admin client to reuse (one is made otherwise).
        now_s: the time against which record ages are measured (default: now).
        time_lag: False leaves ``time_lag_s`` at 0 and reads no record: offsets only, three
            admin requests in all (for frequent samples).
    """
    admin = admin if admin is not None else admin_client(settings)
    committed: dict[tuple[str, str, int], int | None] = {}
    topic_partitions = _topic_partitions(admin, topics) if topics is not None else None
    for group in groups:
        if topic_partitions is not None:
            offsets = _committed(admin, group, topic_partitions)
        else:
            offsets = _committed(admin, group, None)
            for tp in _assigned(admin, group):
                offsets.setdefault(tp, None)
        for (topic, partition), offset in offsets.items():
            committed[(group, topic, partition)] = offset
    if not committed:
        return []
    watermarks = _watermarks(admin, {(t, p) for _, t, p in committed})
    rows: list[PartitionLag] = []
    for (group, topic, partition), offset in sorted(committed.items()):
        marks = watermarks.get((topic, partition))
        if marks is None:
            continue  # the topic is gone, or its leader is unknown for now
        start, end = marks
        lag = max(0, end - consumed_from(offset, start))
        rows.append(PartitionLag(group, topic, partition, offset, start, end, lag, 0.0))
    if not time_lag:
        return rows
    return _with_time_lag(settings, rows, time.time() if now_s is None else now_s)


def consumed_from(committed: int | None, start: int) -> int:
    """Where a group reads a partition from: its committed offset, or the log start when it
    has committed nothing (sluice's consumers begin at ``earliest``). Lag counts from here."""
    return start if committed is None else max(committed, start)


def _topic_partitions(admin: AdminClient, topics: Iterable[str]) -> list[tuple[str, int]]:
    metadata = admin.list_topics(timeout=_REQUEST_TIMEOUT_S).topics
    out = []
    for topic in topics:
        md = metadata.get(topic)
        if md is None or md.error is not None:
            continue
        out += [(topic, p) for p in sorted(md.partitions)]
    return out


def _assigned(admin: AdminClient, group: str) -> list[tuple[str, int]]:
    """The partitions assigned to the group's members now (empty for an idle group)."""
    future = admin.describe_consumer_groups([group], request_timeout=_REQUEST_TIMEOUT_S)[group]
    try:
        description = future.result()
    except KafkaException as exc:
        log.debug("describe group %s: %s", group, exc)
        return []
    return [
        (tp.topic, tp.partition)
        for member in description.members
        for tp in (member.assignment.topic_partitions if member.assignment else [])
    ]


def _committed(
    admin: AdminClient, group: str, partitions: list[tuple[str, int]] | None
) -> dict[tuple[str, int], int | None]:
    """The group's committed offsets on ``partitions`` (None where it committed none), or,
    with ``partitions`` None, on every partition it has committed on."""
    out: dict[tuple[str, int], int | None] = {tp: None for tp in partitions or []}
    if partitions == []:
        return out
    tps = None if partitions is None else [TopicPartition(t, p) for t, p in partitions]
    request = [ConsumerGroupTopicPartitions(group, tps)]
    future = admin.list_consumer_group_offsets(request, request_timeout=_REQUEST_TIMEOUT_S)[group]
    try:
        result = future.result()
    except KafkaException as exc:
        log.debug("committed offsets of %s: %s", group, exc)
        return out
    for tp in result.topic_partitions or []:
        if tp.error is None:
            out[(tp.topic, tp.partition)] = None if tp.offset == OFFSET_INVALID else tp.offset
    return out


def _watermarks(
    admin: AdminClient, partitions: set[tuple[str, int]]
) -> dict[tuple[str, int], tuple[int, int]]:
    """(log start, high watermark) per partition, two batched requests in all."""
    specs = {
        "start": {TopicPartition(t, p): OffsetSpec.earliest() for t, p in partitions},
        "end": {TopicPartition(t, p): OffsetSpec.latest() for t, p in partitions},
    }
    found: dict[str, dict[tuple[str, int], int]] = {"start": {}, "end": {}}
    for which, spec in specs.items():
        futures = admin.list_offsets(spec, request_timeout=_REQUEST_TIMEOUT_S)
        for tp, future in futures.items():
            try:
                found[which][(tp.topic, tp.partition)] = int(future.result().offset)
            except KafkaException as exc:
                log.debug("offsets of %s:%s: %s", tp.topic, tp.partition, exc)
    return {
        tp: (found["start"][tp], end) for tp, end in found["end"].items() if tp in found["start"]
    }


def _with_time_lag(
    settings: Settings, rows: list[PartitionLag], now_s: float, timeout_s: float = 3.0
) -> list[PartitionLag]:
    """Fill in time lags: 0 without offset lag, else the age of the record at the position."""
    behind = {(r.topic, r.partition, r.position) for r in rows if r.lag > 0}
    stamps = read_timestamps(settings, behind, timeout_s) if behind else {}
    out = []
    for r in rows:
        time_lag_s: float | None = 0.0
        if r.lag > 0:
            stamp_s = stamps.get((r.topic, r.partition, r.position))
            time_lag_s = None if stamp_s is None else max(0.0, now_s - stamp_s)
        out.append(dataclasses.replace(r, time_lag_s=time_lag_s))
    return out


def read_timestamps(
    settings: Settings, positions: set[tuple[str, int, int]], timeout_s: float = 3.0
) -> dict[tuple[str, int, int], float]:
    """The timestamp (epoch seconds) of the record at each (topic, partition, offset).

    A short-lived consumer assigns the positions and reads one record from each; a position
    whose record is gone (retention) yields the oldest record still there. A partition asked
    at several offsets (several groups) is read in several rounds.
    """
    found: dict[tuple[str, int, int], float] = {}
    remaining = sorted(positions)
    deadline = time.monotonic() + timeout_s
    while remaining and time.monotonic() < deadline:
        round_: dict[tuple[str, int], int] = {}
        later = []
        for t, p, o in remaining:
            if (t, p) in round_:
                later.append((t, p, o))
            else:
                round_[(t, p)] = o
        found.update(_read_round(settings, round_, deadline))
        remaining = later
    return found


def _read_round(
    settings: Settings, waiting: dict[tuple[str, int], int], deadline: float
) -> dict[tuple[str, int, int], float]:
    consumer = Consumer(
        confluent_config(
            settings,
            **{
                "group.id": READER_GROUP,
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
                "auto.offset.reset": "earliest",
                # The timestamp is all it reads: no waiting for transactions, small fetches.
                "isolation.level": "read_uncommitted",
                "fetch.wait.max.ms": 10,
                "fetch.message.max.bytes": 1024,
                "queued.max.messages.kbytes": 1024,
            },
        )
    )
    found: dict[tuple[str, int, int], float] = {}
    waiting = dict(waiting)
    try:
        consumer.assign([TopicPartition(t, p, o) for (t, p), o in waiting.items()])
        while waiting and time.monotonic() < deadline:
            message = consumer.poll(min(0.2, max(0.0, deadline - time.monotonic())))
            if message is None or message.error() is not None:
                continue
            topic, partition = str(message.topic()), int(message.partition() or 0)
            offset = waiting.pop((topic, partition), None)
            if offset is None:
                continue
            kind, stamp_ms = message.timestamp()
            if kind != TIMESTAMP_NOT_AVAILABLE:
                found[(topic, partition, offset)] = stamp_ms / 1000.0
            consumer.incremental_unassign([TopicPartition(topic, partition)])
    finally:
        consumer.close()
    return found


COLUMNS = ("GROUP", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "TIME-LAG-S")


def format_table(rows: Sequence[PartitionLag]) -> str:
    """``rows`` as an aligned text table (``-``: nothing committed, or age unknown)."""
    cells = [COLUMNS] + [
        (
            r.group,
            r.topic,
            str(r.partition),
            "-" if r.committed is None else str(r.committed),
            str(r.end),
            str(r.lag),
            "-" if r.time_lag_s is None else f"{r.time_lag_s:.1f}",
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    lines = []
    for row in cells:
        # Names left-aligned, numbers right-aligned.
        padded = [c.ljust(widths[i]) if i < 2 else c.rjust(widths[i]) for i, c in enumerate(row)]
        lines.append("  ".join(padded).rstrip())
    return "\n".join(lines)
