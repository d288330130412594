"""End to end on the real broker: requests in, correct responses out, in both modes."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.client import Client
from pipeline.models import ModelRegistry
from tests.integration.conftest import demo_request


@pytest.mark.parametrize("engine", ["batch", "faust"])
@pytest.mark.parametrize("mode", ["fused", "split"])
def test_1000_requests_give_1000_correct_responses(
    mode: str, engine: str, settings, client: Client, start_workers, registry: ModelRegistry
) -> None:
    settings = settings.replace(engine=engine)
    workers = start_workers(settings, mode)
    workers.wait_ready(client)
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((1000, 16)).astype(np.float32)
    futures = [
        client.submit(
            demo_request(f"req-{i}", inputs[i].tolist(), parameters={"top_k": 2}),
            headers={"correlation-id": f"corr-{i}"},
        )
        for i in range(1000)
    ]
    client.flush()
    responses = [f.result(timeout=60) for f in futures]

    model = registry.resolve("demo")
    expected = model.run([inputs])[0]
    assert [r.id for r in responses] == [f"req-{i}" for i in range(1000)]
    assert {r.status for r in responses} == {"ok"}
    assert {r.model_version for r in responses} == {model.version}
    got = np.array([r.outputs[0].data for r in responses], dtype=np.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    labels = [r.outputs[1].data for r in responses]
    assert all(len(top) == 2 for top in labels)
    top1 = [model.config.labels[int(i)] for i in expected.argmax(axis=1)]
    assert [top[0] for top in labels] == top1
    batch_sizes = [r.timings.batch_size for r in responses]
    assert max(batch_sizes) > 1, "requests were never batched"
    assert max(batch_sizes) <= settings.max_batch_size


@pytest.mark.parametrize("engine", ["batch", "faust"])
def test_reply_to_version_and_headers(
    engine: str, settings, client: Client, start_workers, bootstrap
) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from pipeline.kafka import consumer_config, ensure_topics
    from pipeline.protocol import codec

    reply_topic = settings.topic_prefix + ".replies"
    ensure_topics(settings, [reply_topic], partitions=1)
    settings = settings.replace(engine=engine)
    workers = start_workers(settings, "fused")
    workers.wait_ready(client)
    consumer = Consumer(consumer_config(settings, "reply-reader"))
    consumer.assign([TopicPartition(reply_topic, 0, 0)])
    producer_client = client
    producer_client.submit(
        demo_request("to-reply", reply_to=reply_topic, version="1"),
        headers={"correlation-id": "abc", "traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01"},
    )
    producer_client.flush()
    try:
        message = None
        for _ in range(100):
            message = consumer.poll(0.3)
            if message is not None and message.error() is None:
                break
        assert message is not None and message.error() is None
        response = codec.decode_response(message.value())
        assert message.key() == b"to-reply"
        assert response.status == "ok" and response.model_version == "1"
        headers = dict(message.headers() or [])
        assert headers["correlation-id"] == b"abc"
        assert headers["traceparent"].startswith(b"00-111")
    finally:
        consumer.close()


@pytest.mark.parametrize(("engine", "mode"), [("batch", "fused"), ("batch", "split"),
                                              ("faust", "fused")])  # fmt: skip
def test_msgpack_requests_with_raw_tensors(
    engine: str, mode: str, settings, start_workers, registry: ModelRegistry
) -> None:
    settings = settings.replace(engine=engine)
    from pipeline.protocol import codec

    with Client(settings, fmt=codec.MSGPACK) as mp_client:
        start_workers(settings, mode).wait_ready(mp_client)
        inputs = np.random.default_rng(1).standard_normal((200, 16)).astype("<f4")
        futures = [
            mp_client.submit(demo_request(f"mp-{i}", inputs[i].tobytes()))  # type: ignore[arg-type]
            for i in range(200)
        ]
        mp_client.flush()
        responses = [f.result(timeout=60) for f in futures]
    expected = registry.resolve("demo").run([inputs])[0]
    assert {r.status for r in responses} == {"ok"}
    assert all(isinstance(r.outputs[0].data, bytes) for r in responses)
    got = np.stack([codec.tensor_values(r.outputs[0]) for r in responses])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_client_started_before_the_worker_waits_for_its_topic(
    bootstrap: str, model_dir, start_workers
) -> None:
    """The README's order does not matter: a client started first waits (bounded) for the
    worker to create the topics, and without one fails saying what to start."""
    import threading

    from pipeline.client import TopicMissingError
    from tests.integration.conftest import make_settings

    settings = make_settings(bootstrap, model_dir)
    with pytest.raises(TopicMissingError, match=r"start a worker \(`sluice worker`"):
        Client(settings, topic_wait_s=1.0)

    started: list = []
    later = threading.Timer(2.0, lambda: started.append(start_workers(settings, "fused")))
    later.start()
    try:
        with Client(settings, topic_wait_s=120.0) as client:  # before the worker exists
            # Only the worker (started 2 s in) creates the response topic.
            assert started, "the client returned before any worker was started"
            response = client.submit(demo_request("first")).result(timeout=90)
        assert response.status == "ok"
    finally:
        later.cancel()
