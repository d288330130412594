"""The naive pipeline, kept to measure against: one request at a time, each send awaited."""

from __future__ import annotations

from typing import Any

from agents.app import origins, raw_topic
from pipeline.serving import Pipeline


def register(app: Any, pipeline: Pipeline) -> Any:
    # The priority topic is read too (the batch engine also serves it first).
    s = pipeline.settings
    topic = raw_topic(app, s.requests_topic, s.priority_topic)

    @app.agent(topic, name="naive")
    async def naive(stream: Any) -> None:
        async for origin in origins(stream):
            job = await pipeline.gateway(origin)
            if job is not None:
                await pipeline.respond(pipeline.infer([job]))
            await pipeline.drain()

    return naive
