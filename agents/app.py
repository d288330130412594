"""The faust app: one per worker process, its consumer group named after its stage."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from pipeline.config import Settings
from pipeline.kafka import faust_credentials
from pipeline.serving import Headers, Origin, Sink


def _consumer_thread_class(fetch_max_wait_ms: int) -> type:
    class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
        def _create_worker_consumer(self, transport: Any) -> Any:
            consumer = super()._create_worker_consumer(transport)
            # faust hard-codes fetch_max_wait_ms=1500; aiokafka reads it at start().
            consumer._fetch_max_wait_ms = fetch_max_wait_ms
            return consumer

    return ConsumerThread


class SluiceApp(faust.App):
    """A faust app whose aiokafka consumer uses sluice's fetch wait."""

    fetch_max_wait_ms: int = 10

    def _new_transport(self) -> Any:
        thread_class = _consumer_thread_class(self.fetch_max_wait_ms)

        class Consumer(faust_aiokafka.Consumer):
            def _new_consumer_thread(self) -> Any:
                return thread_class(self, loop=self.loop, beacon=self.beacon)

        class Transport(faust_aiokafka.Transport):
            pass

        Transport.Consumer = Consumer
        return Transport(self.conf.broker_consumer, self)


def create_app(settings: Settings, stage: str) -> SluiceApp:
    """The faust app for one stage (its own consumer group) or ``fused``/``naive``."""
    datadir = settings.cache_dir / "faust" / settings.group_id(stage)
    datadir.mkdir(parents=True, exist_ok=True)
    app = SluiceApp(
        settings.group_id(stage),
        broker=f"kafka://{settings.bootstrap_servers()}",
        broker_credentials=faust_credentials(settings),
        store="memory://",
        # faust keeps per-app state in a folder; keep it out of the working directory.
        datadir=str(datadir),
        autodiscover=False,
        web_enabled=False,
        topic_partitions=settings.partitions,
        topic_replication_factor=settings.replication_factor,
        consumer_auto_offset_reset="earliest",
        producer_linger=settings.producer_linger_ms / 1000.0,
        producer_acks=-1,
        producer_max_request_size=settings.max_record_bytes,
        consumer_max_fetch_size=max(settings.max_payload_bytes * 2, 1_048_576),
        broker_commit_interval=1.0,
        # A crashed worker's partitions move to the others after this long.
        broker_session_timeout=settings.session_timeout_ms / 1000.0,
        broker_heartbeat_interval=min(3.0, settings.session_timeout_ms / 3000.0),
        stream_buffer_maxsize=max(settings.max_inflight, 1024),
    )
    app.fetch_max_wait_ms = settings.consumer_fetch_max_wait_ms
    return app


def raw_topic(app: faust.App, *names: str) -> Any:
    return app.topic(*names, key_serializer="raw", value_serializer="raw", internal=False)


def faust_sink(app: faust.App) -> Sink:
    """Publish through the app's producer; returns the delivery future."""

    async def send(topic: str, key: bytes | None, value: bytes, headers: Headers | None) -> Any:
        return await app.producer.send(topic, key, value, None, None, headers or None)

    return send  # type: ignore[return-value]


async def origins(stream: Any) -> AsyncIterator[Origin]:
    """The stream's records as `Origin`s, each acked only when its answer is delivered."""
    stream = stream.noack()
    async for event in stream.events():
        yield origin_of(event, stream)


def origin_of(event: Any, stream: Any) -> Origin:
    """The `Origin` of a faust event; acking it acks the event on its stream."""
    message = event.message
    headers = message.headers
    if isinstance(headers, dict):
        headers = list(headers.items())
    return Origin(
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        timestamp_ms=message.timestamp * 1000.0,
        value=message.value,
        headers=list(headers or ()),
        ack=lambda: stream.ack(event),
        key_bytes=len(message.key or b""),
    )
