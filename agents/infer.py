"""Infer agent: micro-batch admitted requests per model version and run them."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from agents.app import origins, raw_topic
from pipeline.batching.batcher import Batcher
from pipeline.serving import Job, Outcome, Pipeline


class InferStage:
    """One batcher per model version; each flush runs the model and hands outcomes on."""

    def __init__(
        self, pipeline: Pipeline, publish: Callable[[Sequence[Outcome]], Awaitable[None]]
    ) -> None:
        self.pipeline = pipeline
        self.publish = publish
        self.batchers: dict[tuple[str, str], Batcher[Job]] = {}

    async def submit(self, job: Job) -> None:
        key = (job.model.name, job.model.version)
        batcher = self.batchers.get(key)
        if batcher is None:
            s = self.pipeline.settings
            policy = job.model.policy(s.max_delay_s, s.default_ttl_ms / 1000.0 or None)
            batcher = Batcher(
                self._flush, policy.max_batch_size, policy.max_delay_s,
                max(s.max_inflight, policy.max_batch_size), clock=time.time, policy=policy,
            )  # fmt: skip
            for bucket, seconds in job.model.batch_time_s.items():  # measured at warm-up
                batcher.observe(bucket, seconds)
            batcher.start()
            self.batchers[key] = batcher
        deadline_s = job.deadline_ms / 1000.0 if job.deadline_ms is not None else None
        await batcher.put(job, deadline_s)

    async def _flush(self, jobs: list[Job]) -> None:
        await self.publish(self.pipeline.infer(jobs))

    async def flush(self, timeout_s: float) -> None:
        """Wait (bounded) until every queued job is answered and its publishes delivered."""
        deadline = time.monotonic() + timeout_s
        while any(b.pending for b in self.batchers.values()) and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        await asyncio.wait_for(self.pipeline.drain(), max(0.1, deadline - time.monotonic()))


def register(app: Any, pipeline: Pipeline, infer: InferStage) -> Any:
    """Split mode: consume every model's infer topic into the batchers."""
    names = [pipeline.settings.infer_topic(m) for m in pipeline.registry.names]
    topic = raw_topic(app, *names)

    @app.agent(topic, name="infer")
    async def infer_agent(stream: Any) -> None:
        async for origin in origins(stream):
            job = await pipeline.gateway(origin)
            if job is not None:
                await infer.submit(job)

    return infer_agent
