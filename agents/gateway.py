"""Gateway agent: decode and validate requests; forward them (split) or batch them (fused)."""

from __future__ import annotations

from typing import Any

from agents.app import origins, raw_topic
from agents.infer import InferStage
from pipeline.serving import Pipeline


def register(app: Any, pipeline: Pipeline, infer: InferStage | None) -> Any:
    """The gateway agent; ``infer`` set means fused mode (hand-off in memory)."""
    # The priority topic is read too (the batch engine also serves it first).
    s = pipeline.settings
    topic = raw_topic(app, s.requests_topic, s.priority_topic)

    @app.agent(topic, name="gateway")
    async def gateway(stream: Any) -> None:
        async for origin in origins(stream):
            job = await pipeline.gateway(origin)
            if job is None:
                continue
            for j in (job, job.mirror) if job.mirror is not None else (job,):
                if infer is not None:
                    await infer.submit(j)
                else:
                    await pipeline.forward(j)

    return gateway
