"""The naive pipeline, kept to measure against: one request at a time, each send awaited."""

from __future__ import annotations

from typing import Any

from agents.app import origin_of, raw_topic
from pipeline.stages import Pipeline


def register(app: Any, pipeline: Pipeline) -> Any:
    topic = raw_topic(app, pipeline.settings.requests_topic)

    @app.agent(topic, name="naive")
    async def naive(stream: Any) -> None:
        stream = stream.noack()
        async for event in stream.events():
            job = await pipeline.gateway(origin_of(event, stream))
            if job is not None:
                await pipeline.respond(pipeline.infer([job]))
            await pipeline.drain()

    return naive
