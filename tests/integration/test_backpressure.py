"""Split mode: the gateway pauses while the infer stage lags, so work waits in Kafka."""

from __future__ import annotations

import time

from confluent_kafka import Consumer

from pipeline.client import Client
from pipeline.kafka import consumer_config, ensure_topics, high_watermark, pipeline_topics
from pipeline.ops import procs
from tests.integration.conftest import demo_request, make_settings


def _topic_size(consumer: Consumer, topic: str, partitions: int) -> int:
    return sum(high_watermark(consumer, topic, p) for p in range(partitions))


def test_gateway_pauses_on_infer_lag_and_resumes(bootstrap: str, model_dir, tmp_path) -> None:
    settings = make_settings(
        bootstrap, model_dir, backpressure_high_water=300, backpressure_low_water=100,
        backpressure_interval_s=0.1,
    )  # fmt: skip
    ensure_topics(settings, pipeline_topics(settings, ["demo"]))
    probe = Consumer(consumer_config(settings, f"{settings.topic_prefix}-probe"))
    infer_topic = settings.infer_topic("demo")
    # Only the gateway runs: nothing consumes the infer topic, so its lag only grows.
    gateway = [procs.spawn(settings, ["worker", "--mode", "split", "--stage", "gateway"],
                           tmp_path / "gateway.log")]  # fmt: skip
    later: list = []
    try:
        with Client(settings) as client:
            futures = []
            for i in range(3000):  # ~1,000/s: the checks (every 0.1 s) see the lag grow
                futures.append(client.submit(demo_request(f"bp-{i}")))
                if i % 100 == 99:
                    client.flush()
                    time.sleep(0.1)
            client.flush()
            deadline = time.monotonic() + 60
            while _topic_size(probe, infer_topic, settings.partitions) < 300:
                assert time.monotonic() < deadline, (tmp_path / "gateway.log").read_text()[-3000:]
                time.sleep(0.2)
            time.sleep(3)  # the gateway has had time to forward everything, were it not paused
            forwarded = _topic_size(probe, infer_topic, settings.partitions)
            # Of 3,000, the rest waits in Kafka. The gateway decides on every batch, on the
            # lag it last read plus what it forwarded that the read could not see, so at most
            # the batch that crossed the high-water mark gets through: however fast it runs.
            assert 300 <= forwarded <= 300 + settings.max_batch_size, forwarded
            assert gateway[0].poll() is None

            # The next stages start: the lag drains, the gateway resumes, all are answered.
            later = [
                procs.spawn(settings, ["worker", "--mode", "split", "--stage", stage],
                            tmp_path / f"{stage}.log")
                for stage in ("infer", "respond")
            ]  # fmt: skip
            responses = [f.result(timeout=120) for f in futures]
            assert {r.status for r in responses} == {"ok"}
            assert _topic_size(probe, infer_topic, settings.partitions) == 3000
    finally:
        procs.stop(gateway + later)
        probe.close()
