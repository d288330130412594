"""The feature tables and the prefetcher under the faust engine.

The gateway's `Pipeline` owns the feature store (L1, the per-partition RocksDB tables with
their changelog, the prefetcher threads): here the tables follow the app's partition
assignment, as the batch engine's rebalance callbacks make them do. Restoring a partition
replays its changelog on a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

import faust

from pipeline.serving import Pipeline


def register(app: faust.App, pipeline: Pipeline) -> None:
    """Restore assigned request partitions' tables; close revoked ones."""
    features = pipeline.features
    if features is None:
        return
    topic = pipeline.settings.requests_topic

    def partitions(tps: Any) -> list[int]:
        return sorted(tp.partition for tp in tps if tp.topic == topic)

    @app.on_partitions_assigned.connect  # type: ignore[arg-type]
    async def _restore(app: Any, assigned: Any, **kwargs: Any) -> None:
        ps = partitions(assigned)
        if ps:
            # Marked restoring before the loop runs another record, restored off the loop.
            await asyncio.to_thread(features.claim(ps))

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]
    async def _close(app: Any, revoked: Any, **kwargs: Any) -> None:
        ps = partitions(revoked)
        if ps:
            await asyncio.to_thread(features.revoke, ps)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]
    async def _shutdown(app: Any, **kwargs: Any) -> None:
        await asyncio.to_thread(pipeline.close)
