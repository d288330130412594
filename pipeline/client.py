"""A request/reply client: produce requests, resolve futures from the response stream by id."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, Producer, TopicPartition

from pipeline.config import Settings
from pipeline.errors import SluiceError
from pipeline.kafka import (
    consume_batch,
    consumer_config,
    high_watermark,
    produce,
    producer_config,
)
from pipeline.protocol import codec

Request = dict[str, Any] | codec.Request


class TopicMissingError(SluiceError, RuntimeError):
    """The topic a client reads does not exist (yet): no worker has created it."""


class Client:
    """Thread-safe synchronous client; `AsyncClient` wraps it for asyncio code.

    It reads the response topic from its current end, so only responses to requests sent
    after construction are seen. Each pending request holds one future; `max_pending` bounds
    how many may wait at once. A client started before the worker (which creates the
    pipeline's topics) waits up to ``topic_wait_s`` for the response topic to appear.
    """

    def __init__(
        self,
        settings: Settings,
        response_topic: str | None = None,
        max_pending: int = 100_000,
        fmt: str = codec.JSON,
        topic_wait_s: float = 60.0,
    ) -> None:
        if fmt not in (codec.JSON, codec.MSGPACK):
            raise ValueError(f"fmt must be {codec.JSON!r} or {codec.MSGPACK!r}, got {fmt!r}")
        self.settings = settings
        self.fmt = fmt
        self.response_topic = response_topic or settings.responses_topic
        self.max_pending = max_pending
        self._pending: dict[str, concurrent.futures.Future[codec.Response]] = {}
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(max_pending)
        self._producer = Producer(producer_config(settings, **{"linger.ms": 1}))
        self._consumer = Consumer(
            consumer_config(
                settings,
                f"sluice-client-{uuid.uuid4().hex[:12]}",
                # Exactly-once workers publish in transactions: never read aborted answers.
                **{"enable.auto.commit": False, "isolation.level": "read_committed"},
            )
        )
        try:
            self._assign_from_end(topic_wait_s)
        except BaseException:
            self._consumer.close()
            raise
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._consume, name="sluice-client", daemon=True)
        self._thread.start()

    def _assign_from_end(self, topic_wait_s: float) -> None:
        deadline = time.monotonic() + topic_wait_s
        while True:
            metadata = self._consumer.list_topics(self.response_topic, timeout=15)
            topic = metadata.topics.get(self.response_topic)
            if topic is not None and topic.error is None and topic.partitions:
                break
            if time.monotonic() >= deadline:
                raise TopicMissingError(
                    f"response topic {self.response_topic!r} does not exist on "
                    f"{self.settings.bootstrap_servers()} after {topic_wait_s:g} s: start a "
                    "worker (`sluice worker`, which creates the pipeline's topics) with the "
                    "same SLUICE_BOOTSTRAP and SLUICE_TOPIC_PREFIX, or create the topic"
                )
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        assignment = []
        for p in topic.partitions:
            high = high_watermark(self._consumer, self.response_topic, p)
            assignment.append(TopicPartition(self.response_topic, p, high))
        self._consumer.assign(assignment)

    def submit(
        self,
        request: Request,
        headers: dict[str, str] | None = None,
        topic: str | None = None,
    ) -> concurrent.futures.Future[codec.Response]:
        """Produce one request; the future resolves with its `codec.Response`."""
        if isinstance(request, dict):
            request_id, key = str(request["id"]), request.get("key") or request["id"]
        else:
            request_id, key = request.id, request.key or request.id
        if self.fmt != codec.JSON:
            headers = {**(headers or {}), codec.CONTENT_TYPE_HEADER: self.fmt}
        value = codec.encode(request, self.fmt)
        return self.submit_raw(request_id, value, str(key).encode(), headers, topic)

    def submit_raw(
        self,
        request_id: str,
        value: bytes | None,
        key: bytes | None = None,
        headers: dict[str, str] | None = None,
        topic: str | None = None,
    ) -> concurrent.futures.Future[codec.Response]:
        """Produce an already-encoded request whose id is ``request_id``."""
        future = self.expect(request_id)
        try:
            self._produce(
                topic or self.settings.requests_topic,
                key or request_id.encode(),
                value,
                list((headers or {}).items()),
            )
        except BaseException:
            self._resolve(request_id, None, KeyError(request_id))
            raise
        return future

    def expect(self, request_id: str) -> concurrent.futures.Future[codec.Response]:
        """A future for the response to ``request_id``, produced by someone else (a replay)."""
        if not self._slots.acquire(timeout=60):
            raise TimeoutError(f"more than {self.max_pending} requests pending")
        future: concurrent.futures.Future[codec.Response] = concurrent.futures.Future()
        with self._lock:
            self._pending[request_id] = future
        return future

    def _produce(self, topic: str, key: bytes, value: bytes | None, headers: list[Any]) -> None:
        produce(self._producer, topic, value, key, headers or None)
        self._producer.poll(0)

    def infer(
        self, request: Request, timeout_s: float = 30.0, headers: dict[str, str] | None = None
    ) -> codec.Response:
        """Send one request and wait for its response."""
        future = self.submit(request, headers=headers)
        self.flush()
        return future.result(timeout=timeout_s)

    def flush(self, timeout_s: float = 30.0) -> None:
        remaining = self._producer.flush(timeout_s)
        if remaining:
            raise TimeoutError(f"{remaining} requests not delivered after {timeout_s}s")

    def _resolve(self, request_id: str, response: codec.Response | None, error: Any) -> None:
        with self._lock:
            future = self._pending.pop(request_id, None)
        if future is None:
            return  # a duplicate, or a response to some other client
        self._slots.release()
        if response is not None:
            future.set_result(response)
        elif not future.done():
            future.set_exception(error)

    def _consume(self) -> None:
        while not self._closed.is_set():
            for message in consume_batch(self._consumer, 500, 0.1):
                if message.error() is not None or message.value() is None:
                    continue
                try:
                    fmt = codec.content_type(message.headers())
                    response = codec.decode_response(message.value(), fmt)
                except Exception:  # noqa: BLE001 - not a response record: skip it
                    continue
                self._resolve(response.id, response, None)
            self._producer.poll(0)

    def close(self) -> None:
        with self._lock:
            pending = list(self._pending.items())
            self._pending.clear()
        for _, future in pending:
            future.cancel()
        self._closed.set()
        self._thread.join(timeout=10)
        self._producer.flush(10)
        self._consumer.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio face of `Client`: ``await client.infer(request)``."""

    def __init__(self, settings: Settings, **kwargs: Any) -> None:
        self._client = Client(settings, **kwargs)

    async def infer(
        self, request: Request, timeout_s: float = 30.0, headers: dict[str, str] | None = None
    ) -> codec.Response:
        future = self._client.submit(request, headers=headers)
        await asyncio.get_running_loop().run_in_executor(None, self._client.flush)
        return await asyncio.wait_for(asyncio.wrap_future(future), timeout_s)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self._client.close)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
