"""Offset and time lag on a real broker: `pipeline.kafka.lag.describe`, the monitor and
`sluice lag`."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner
from confluent_kafka import Consumer, Producer, TopicPartition
from prometheus_client import CollectorRegistry

from pipeline.cli import main as cli_main
from pipeline.config import Settings
from pipeline.kafka import consumer_config, ensure_topics, lag, producer_config
from pipeline.observability.lag_monitor import LagMonitor
from pipeline.observability.metrics import Metrics
from tests.integration.conftest import make_settings

# Partition 0: 10 records stamped 1_000_000 + i seconds; the group commits offset 4 (lag 6).
# Partition 1: 3 records; the group commits offset 3 (no lag).
BASE_S = 1_000_000.0


@pytest.fixture
def lagging(bootstrap: str, model_dir: Path) -> tuple[Settings, str, str]:
    settings = make_settings(bootstrap, model_dir)
    topic = settings.topic_prefix + ".lagging"
    group = settings.group_id("lagging")
    ensure_topics(settings, [topic], partitions=2)
    producer = Producer(producer_config(settings))
    for i in range(10):
        producer.produce(topic, b"x", partition=0, timestamp=int((BASE_S + i) * 1000))
    for _ in range(3):
        producer.produce(topic, b"y", partition=1)
    assert producer.flush(15) == 0
    consumer = Consumer(consumer_config(settings, group))
    try:
        consumer.commit(
            offsets=[TopicPartition(topic, 0, 4), TopicPartition(topic, 1, 3)], asynchronous=False
        )
    finally:
        consumer.close()
    return settings, topic, group


def test_describe_committed_group(lagging: tuple[Settings, str, str]) -> None:
    settings, topic, group = lagging
    rows = lag.describe(settings, [group], now_s=BASE_S + 100)
    assert [(r.group, r.topic, r.partition) for r in rows] == [(group, topic, 0), (group, topic, 1)]
    p0, p1 = rows
    assert (p0.committed, p0.start, p0.end, p0.lag) == (4, 0, 10, 6)
    assert p0.time_lag_s == pytest.approx(96.0)  # the record at offset 4 was stamped BASE_S + 4
    assert (p1.committed, p1.end, p1.lag, p1.time_lag_s) == (3, 3, 0, 0.0)


def test_describe_on_topics_counts_an_uncommitted_group_from_the_log_start(
    lagging: tuple[Settings, str, str],
) -> None:
    settings, topic, group = lagging
    fresh = f"{settings.topic_prefix}-nobody-{uuid.uuid4().hex[:6]}"
    rows = lag.describe(settings, [group, fresh], topics=[topic], now_s=BASE_S + 100)
    by_key = {(r.group, r.partition): r for r in rows}
    assert set(by_key) == {(group, 0), (group, 1), (fresh, 0), (fresh, 1)}
    assert by_key[(fresh, 0)].committed is None
    assert by_key[(fresh, 0)].lag == 10
    assert by_key[(fresh, 0)].time_lag_s == pytest.approx(100.0)
    assert by_key[(fresh, 1)].lag == 3
    assert by_key[(group, 0)].time_lag_s == pytest.approx(96.0)


def test_list_groups_by_prefix(lagging: tuple[Settings, str, str]) -> None:
    settings, _, group = lagging
    admin = lag.admin_client(settings)
    assert lag.list_groups(admin, settings.topic_prefix) == [group]
    assert group in lag.list_groups(admin)


def test_monitor_exports_the_group(lagging: tuple[Settings, str, str]) -> None:
    settings, topic, group = lagging
    registry = CollectorRegistry()
    monitor = LagMonitor(settings, Metrics(registry), [group], [topic])
    monitor.sample()

    def value(name: str, partition: int) -> float | None:
        labels = {"group": group, "topic": topic, "partition": str(partition)}
        return registry.get_sample_value(name, labels)

    assert value("sluice_consumer_lag", 0) == 6
    assert value("sluice_consumer_lag", 1) == 0
    assert value("sluice_consumer_committed_offset", 0) == 4
    assert value("sluice_consumer_time_lag_seconds", 0) > 1e8  # stamped in 1970
    assert value("sluice_consumer_time_lag_seconds", 1) == 0


def test_sluice_lag_command(lagging: tuple[Settings, str, str]) -> None:
    settings, topic, group = lagging
    env = settings.to_env()
    result = CliRunner().invoke(cli_main, ["lag"], env=env)  # groups by topic prefix
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == list(lag.COLUMNS)
    assert lines[1].split()[:6] == [group, topic, "0", "4", "10", "6"]
    assert float(lines[1].split()[6]) > 1e8
    assert lines[2].split() == [group, topic, "1", "3", "3", "0", "0.0"]

    missing = f"{settings.topic_prefix}-missing"
    result = CliRunner().invoke(cli_main, ["lag", "--group", group, "--group", missing], env=env)
    assert result.exit_code == 0, result.output
    assert f"no committed offsets and no members: {missing}" in result.output
