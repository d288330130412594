"""Respond agent (split mode): postprocess results and publish responses."""

from __future__ import annotations

from typing import Any

from agents.app import origin_of, raw_topic
from pipeline.stages import Pipeline


def register(app: Any, pipeline: Pipeline) -> Any:
    topic = raw_topic(app, pipeline.settings.results_topic)

    @app.agent(topic, name="respond")
    async def respond(stream: Any) -> None:
        stream = stream.noack()
        async for event in stream.events():
            await pipeline.respond_record(origin_of(event, stream))

    return respond
