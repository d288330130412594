"""Features fetched off the loop: a request whose features only the cold source has waits
for them on a thread, so that the requests behind it (and the device) do not wait. Its
consumed batch stays held (offsets not stored) until it is admitted and answered."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_any
from typing import Any

from pipeline.engines.offsets import ConsumedBatch
from pipeline.serving import Deferred, Job, Pipeline, Publication

# Feature-source round trips in flight at once for requests the caches could not enrich.
ENRICH_THREADS = 4


class Enricher:
    """The deferred requests of consumed batches, and their fetches in flight."""

    def __init__(self, pipeline: Pipeline, threads: int = ENRICH_THREADS) -> None:
        self.pipeline = pipeline
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="sluice-enrich")
        self._fetching: list[tuple[Future[Any], Deferred, ConsumedBatch]] = []
        self.deferred = 0  # requests waiting for their features

    def __bool__(self) -> bool:
        """Whether any fetch is in flight."""
        return bool(self._fetching)

    def defer(self, deferred: Deferred, batch: ConsumedBatch) -> None:
        """Fetch ``deferred``'s features on a thread; ``batch`` is held until they come."""
        batch.held += deferred.count
        self.deferred += deferred.count
        future = self._pool.submit(self.pipeline.fetch_features, deferred)
        self._fetching.append((future, deferred, batch))

    def wait(self, timeout_s: float) -> None:
        """Wait until a fetch finishes, at most ``timeout_s``."""
        wait_any([f for f, _, _ in self._fetching], timeout_s, FIRST_COMPLETED)

    def ready(self, wait: bool = False) -> Iterator[tuple[list[Job | Publication], ConsumedBatch]]:
        """The admitted (or rejected) requests whose features have come, with their batch:
        all of them, waiting for each, with ``wait``."""
        still: list[tuple[Future[Any], Deferred, ConsumedBatch]] = []
        fetching, self._fetching = self._fetching, still
        for future, deferred, batch in fetching:
            if not (wait or future.done()):
                still.append((future, deferred, batch))
                continue
            admitted = self.pipeline.admit_fetched(deferred, future.result())
            self.deferred -= deferred.count
            batch.held -= deferred.count
            yield admitted, batch

    def close(self) -> None:
        self._pool.shutdown(wait=False)
