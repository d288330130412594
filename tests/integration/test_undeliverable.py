"""Answers the broker refuses for themselves end their request, not the worker: a reply_to
topic whose ``max.message.bytes`` is smaller than the answer (`record_too_large`: an error
answer there and a DLQ record), and a reply_to topic no client may write to (Kafka's own
``__consumer_offsets``; `delivery_failed`: a DLQ record and an error answer on the default
responses topic). The requests around them are answered, and the worker keeps running.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient, NewTopic

from benchmarks.harness import TopicReader
from pipeline.client import Client
from pipeline.kafka import confluent_config, ensure_topics, pipeline_topics
from pipeline.protocol import codec
from tests.integration.conftest import demo_request, make_settings

# A demo answer (ten logits, timings) is ~450 bytes of JSON; an error answer ~300.
SMALL_TOPIC_MAX_BYTES = 420


@pytest.mark.parametrize(("engine", "mode"), [("batch", "fused"), ("batch", "split"),
                                              ("faust", "fused")])  # fmt: skip
def test_refused_answers_are_dead_lettered_and_the_worker_goes_on(
    engine: str, mode: str, bootstrap: str, model_dir: Path, start_workers
) -> None:
    # An operator's allowlist that names a topic the broker refuses (Kafka's own): the
    # default refuses such a reply_to at admission.
    settings = make_settings(
        bootstrap, model_dir, engine=engine, reply_to_topics="*.replies,__consumer_offsets"
    )
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    small = f"{settings.topic_prefix}.small.replies"
    admin = AdminClient(confluent_config(settings))
    config = {"max.message.bytes": str(SMALL_TOPIC_MAX_BYTES), "compression.type": "uncompressed"}
    admin.create_topics([NewTopic(small, 1, 1, config=config)])[small].result(30)

    with Client(settings) as client:
        workers = start_workers(settings, mode)
        workers.wait_ready(client)
        good = [client.submit(demo_request(f"good-{i}")) for i in range(5)]
        client.submit(demo_request("too-large", reply_to=small))
        forbidden = client.submit(demo_request("forbidden", reply_to="__consumer_offsets"))
        good += [client.submit(demo_request(f"good-after-{i}")) for i in range(5)]
        client.flush()
        assert {f.result(timeout=60).status for f in good} == {"ok"}
        answer = forbidden.result(timeout=60)  # on the default topic: its own refuses it
        assert answer.status == "error" and answer.error is not None
        assert answer.error.code == codec.DELIVERY_FAILED

        with TopicReader(settings, small) as reader:
            reader.read_until(lambda: len(reader.records) >= 1, 60)
            replies = [codec.decode_response(r.value) for r in reader.records]
        assert [(r.id, r.status) for r in replies] == [("too-large", "error")]
        assert replies[0].error is not None
        assert replies[0].error.code == codec.RECORD_TOO_LARGE

        dlq: list[codec.DlqRecord] = []
        with TopicReader(settings, settings.dlq_topic) as reader:
            reader.read_until(lambda: len(reader.records) >= 2, 60)
            dlq = [codec.decode_dlq(r.value) for r in reader.records]
        by_id = {r.request_id: r for r in dlq}
        assert sorted(by_id) == ["forbidden", "too-large"] and len(dlq) == 2
        assert by_id["too-large"].reason == codec.RECORD_TOO_LARGE
        assert by_id["forbidden"].reason == codec.DELIVERY_FAILED
        for record in dlq:
            assert not record.truncated and record.error
            if record.stage != "respond":  # split's respond stage keeps the result record
                original = json.loads(base64.b64decode(record.original_b64))
                assert original["id"] == record.request_id
        assert workers.alive(), workers.logs()
