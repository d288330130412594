"""A three-broker cluster that loses brokers: the requests partition's leader killed mid-run
(under exactly-once the transaction coordinator too) and every broker restarted in turn,
under load. Nothing is lost; exactly-once shows no duplicate to a read_committed reader.

The scenarios are `benchmarks.chaos.leader_kill` and `rolling_restart`, each on a cluster of
its own (three KRaft nodes with small heaps, to fit beside the session's broker on 2 cores).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource

from benchmarks import chaos
from pipeline.kafka import ensure_topics
from pipeline.ops.broker.cluster import LocalCluster
from tests.integration.conftest import make_settings

# At 150/s: about 20 s of load, long enough to span the kill, the outage and the return.
N = 3000


def _check(result: dict, n: int) -> None:  # type: ignore[type-arg]
    print(result)
    assert result["brokers"] == 3
    assert result["crashes_unexpected"] == 0, "the worker exited"
    assert result["sent"] == n
    assert result["answered"] == n and result["lost"] == 0, result.get("broker_log_tail")
    assert result["outcomes"] == {"ok": n}
    assert result["recovery_s"] >= 0


@pytest.mark.timeout(600)
@pytest.mark.parametrize("delivery", ["at_least_once", "exactly_once"])
def test_killing_the_leader_loses_nothing(model_dir: Path, tmp_path: Path, delivery: str) -> None:
    settings = make_settings("", model_dir, delivery=delivery)
    result = chaos.leader_kill(settings, tmp_path, requests=N, rate=150.0)
    _check(result, N)
    assert result["faults"][0].startswith("killed node")
    if delivery == "exactly_once":
        assert result["duplicates_seen"] == 0


@pytest.mark.timeout(600)
def test_a_rolling_restart_loses_nothing(model_dir: Path, tmp_path: Path) -> None:
    settings = make_settings("", model_dir)
    result = chaos.rolling_restart(settings, tmp_path, requests=2 * N, rate=150.0)
    _check(result, 2 * N)
    assert len(result["faults"]) == 3


@pytest.mark.timeout(300)
def test_topics_on_the_cluster_replicate_three_times_and_need_two_in_sync(
    model_dir: Path, tmp_path: Path
) -> None:
    cluster = LocalCluster(tmp_path / "cluster", make_settings("", model_dir).cache_dir)
    bootstrap = cluster.start()
    try:
        settings = make_settings(bootstrap, model_dir)
        ensure_topics(settings, [settings.requests_topic])
        admin = AdminClient({"bootstrap.servers": bootstrap})
        # Each node learns of a new topic on its own: the one asked may not have yet.
        deadline = time.monotonic() + 30
        while True:
            topic = admin.list_topics(settings.requests_topic, timeout=10).topics[
                settings.requests_topic
            ]
            if topic.partitions or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert {len(p.replicas) for p in topic.partitions.values()} == {3}
        resource = ConfigResource(ConfigResource.Type.TOPIC, settings.requests_topic)
        # describe_configs goes to any node, which may not know the topic yet either.
        deadline = time.monotonic() + 30
        while True:
            try:
                configs = next(iter(admin.describe_configs([resource]).values())).result()
                break
            except KafkaException as error:
                unknown = error.args[0].code() == KafkaError.UNKNOWN_TOPIC_OR_PART
                if not unknown or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert configs["min.insync.replicas"].value == "2"
    finally:
        cluster.stop()
