"""The secured broker (`sluice broker start --secure`): a worker serves through SASL_SSL with
SCRAM and ACLs; clients without the right credentials or certificates are refused; the
worker's principal can do what its ACLs say and nothing else; its secrets appear nowhere."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from benchmarks.harness import Workers, demo_request
from pipeline.client import Client
from pipeline.config import Settings, default_cache_dir
from pipeline.models import ModelRegistry
from pipeline.ops.broker import BrokerState, LocalBroker, free_port
from pipeline.ops.broker.secure import Security, issue, make_ca


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalBroker, BrokerState]]:
    cache = Path(os.environ.get("SLUICE_CACHE_DIR") or default_cache_dir())
    broker = LocalBroker(tmp_path_factory.mktemp("kafka-secure"), cache, heap_mb=512, secure=True)
    state = broker.start()
    try:
        yield broker, state
    finally:
        broker.stop()


def _env_settings(env_file: Path, **overrides: Any) -> Settings:
    env = dict(line.split("=", 1) for line in env_file.read_text().splitlines())
    return Settings.from_env(env, **overrides)


def _refused(config: dict[str, Any]) -> str:
    """The error a client with ``config`` gets when it asks for metadata."""
    admin = AdminClient({**config, "log_level": 0, "socket.timeout.ms": 4000})
    with pytest.raises(KafkaException) as info:
        admin.list_topics(timeout=6)
    return str(info.value)


def test_a_worker_serves_through_the_secured_broker_and_its_secrets_appear_nowhere(
    secured: tuple[LocalBroker, BrokerState], model_dir: Path, tmp_path: Path
) -> None:
    broker, state = secured
    prefix = f"t{uuid.uuid4().hex[:10]}"
    base = Settings.from_env({}, topic_prefix=prefix, model_dir=model_dir, partitions=2)
    env_file = broker.provision(base, ModelRegistry(model_dir).names)
    assert oct(env_file.stat().st_mode & 0o777) == "0o600"
    port = free_port()
    worker = _env_settings(env_file, topic_prefix=prefix, model_dir=model_dir, partitions=2,
                           metrics_port=port, max_delay_s=0.002)  # fmt: skip
    assert worker.security_protocol == "SASL_SSL" and worker.sasl_username == "sluice"
    secret = worker.sasl_password
    assert secret and secret not in repr(worker)
    admin = broker.security.admin
    client_settings = worker.replace(sasl_username=admin.username, sasl_password=admin.password)
    workers = Workers(worker, "fused", tmp_path / "logs").start()
    try:
        with Client(client_settings) as client:
            workers.wait_ready(client)
            futures = [client.submit(demo_request(f"s-{i}")) for i in range(20)]
            client.flush()
            answers = [f.result(timeout=60) for f in futures]
        assert {a.status for a in answers} == {"ok"}
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/summary", timeout=5) as r:
            summary = r.read().decode()
        json.loads(summary)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
        assert workers.alive()
    finally:
        workers.stop()
    for where, text in (("summary", summary), ("metrics", metrics), ("log", workers.logs())):
        assert secret not in text and admin.password not in text, where


def test_clients_without_the_right_credentials_or_certificates_are_refused(
    secured: tuple[LocalBroker, BrokerState], tmp_path: Path
) -> None:
    broker, state = secured
    sec = broker.security
    good = {"bootstrap.servers": state.bootstrap, **sec.client_config(sec.worker)}
    AdminClient({**good, "log_level": 0}).list_topics(timeout=10)  # the control: admitted

    _refused({"bootstrap.servers": state.bootstrap})  # plaintext
    _refused({**good, "security.protocol": "SSL"})  # TLS, no credentials
    _refused({**good, "sasl.password": "wrong-" + sec.worker.password})
    _refused({**good, "sasl.username": "nobody"})
    other_ca = make_ca(tmp_path / "other", "other-ca")
    _refused({**good, "ssl.ca.location": str(other_ca[0])})  # the broker is not who it says

    # The broker's own listener takes client certificates from the local CA only.
    internal = {"bootstrap.servers": f"127.0.0.1:{state.internal_port}",
                "security.protocol": "SSL", "ssl.ca.location": str(sec.ca_file)}  # fmt: skip
    own = Path(broker.state_dir / "tls")
    AdminClient({**internal, "log_level": 0, "ssl.certificate.location": str(own / "broker.pem"),
                 "ssl.key.location": str(own / "broker.key")}).list_topics(timeout=10)  # fmt: skip
    forged = issue(tmp_path / "other", other_ca, "broker")
    _refused({**internal, "ssl.certificate.location": str(forged[0]),
              "ssl.key.location": str(forged[1])})  # fmt: skip
    _refused(internal)  # no certificate at all


def test_the_worker_principal_has_its_acls_and_nothing_else(
    secured: tuple[LocalBroker, BrokerState], model_dir: Path
) -> None:
    broker, state = secured
    sec: Security = broker.security
    prefix = f"t{uuid.uuid4().hex[:10]}"
    base = Settings.from_env({}, topic_prefix=prefix, model_dir=model_dir)
    broker.provision(base, ModelRegistry(model_dir).names)
    su = {"bootstrap.servers": state.bootstrap, "log_level": 0, **sec.client_config(sec.admin)}
    me = {"bootstrap.servers": state.bootstrap, "log_level": 0, **sec.client_config(sec.worker)}
    outside = f"{prefix}x.secrets"  # one character past the prefix
    admin = AdminClient(su)
    for f in admin.create_topics([NewTopic(outside, 1, 1)]).values():
        f.result()
    producer = Producer(su)
    producer.produce(outside, b"private")
    producer.produce(f"{prefix}.requests", b"{}", partition=0)
    assert producer.flush(30) == 0

    def first_record(topic: str) -> Any:
        """The first record (or error) a consumer in the worker's group prefix gets."""
        consumer = Consumer({**me, "group.id": f"{prefix}-probe", "enable.auto.commit": False,
                             "auto.offset.reset": "earliest"})  # fmt: skip
        try:
            consumer.subscribe([topic])
            for _ in range(30):
                m = consumer.poll(1.0)
                if m is not None:
                    return m
            return None
        finally:
            consumer.close()

    mine = first_record(f"{prefix}.requests")
    assert mine is not None and mine.error() is None and mine.value() == b"{}"
    theirs = first_record(outside)
    assert theirs is not None and theirs.error() is not None
    assert theirs.error().name() == "TOPIC_AUTHORIZATION_FAILED"
    # Its metadata shows its own topics only.
    visible = AdminClient(me).list_topics(timeout=10).topics
    assert f"{prefix}.requests" in visible
    assert outside not in visible or visible[outside].error is not None

    # It may not create a topic, nor write where it only reads.
    mine_admin = AdminClient(me)
    created = mine_admin.create_topics([NewTopic(f"{prefix}.made-up", 1, 1)])
    with pytest.raises(KafkaException, match="AUTHORIZATION_FAILED"):
        next(iter(created.values())).result()
    errors: list[Any] = []
    writer = Producer({**me, "message.timeout.ms": 10_000})
    writer.produce(outside, b"x", on_delivery=lambda err, msg: errors.append(err))
    writer.produce(f"{prefix}.responses", b"x", on_delivery=lambda err, msg: errors.append(err))
    writer.flush(30)
    names = sorted(e.name() if e is not None else "ok" for e in errors)
    assert names == ["TOPIC_AUTHORIZATION_FAILED", "ok"], names
