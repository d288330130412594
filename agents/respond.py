"""Respond agent (split mode): postprocess results and publish responses."""

from __future__ import annotations

from typing import Any

from agents.app import origins, raw_topic
from pipeline.serving import Pipeline


def register(app: Any, pipeline: Pipeline) -> Any:
    topic = raw_topic(app, pipeline.settings.results_topic)

    @app.agent(topic, name="respond")
    async def respond(stream: Any) -> None:
        async for origin in origins(stream):
            await pipeline.respond_record(origin)

    return respond
