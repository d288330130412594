"""What travels through the serving layer: the Kafka record a request came from (`Origin`),
an admitted request (`Job`), what became of it (`Outcome`), and the records to publish."""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import numpy as np

from pipeline.models import LoadedModel
from pipeline.models.runtime import Pending
from pipeline.protocol import codec
from pipeline.protocol.codec import RequestError

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)


Headers = list[tuple[str, bytes]]
ORIGIN_HEADER = "sluice-origin"
# Split mode: the experiment's choice on an infer record (the version, the variant, and a
# mirrored request's role), made by the gateway.
VERSION_HEADER = "sluice-version"
VARIANT_HEADER = "sluice-variant"
ROLE_HEADER = "sluice-role"
# The prefetcher learns key sequences per session: this header names it (else: partition).
SESSION_HEADER = "session-id"


class Sink(Protocol):
    """Publishes one record; the returned awaitable resolves when the broker has it."""

    async def __call__(
        self, topic: str, key: bytes | None, value: bytes, headers: Headers | None
    ) -> Awaitable[Any]: ...


class Origin(msgspec.Struct):
    """The Kafka record a request came from: for the DLQ, deadlines and acking."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: float
    value: bytes | None
    headers: Headers = msgspec.field(default_factory=list)
    ack: Callable[[], Any] | None = None
    key_bytes: int = 0  # the record key's size (the key itself is not kept)

    def header(self, name: str) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    def correlation_headers(self) -> Headers:
        """The headers a response carries over: the first of each name, however many came."""
        if not self.headers:
            return []
        found: dict[str, Any] = {}
        for k, v in self.headers:
            if k in codec.CORRELATION_HEADERS and k not in found:
                found[k] = v
        return list(found.items())


class Job(msgspec.Struct):
    """An admitted request on its way through a model."""

    request: codec.Request
    model: LoadedModel
    arrays: list[np.ndarray]
    deadline_ms: float | None
    origin: Origin
    received_ms: float
    started_ms: float = 0.0
    # The result cache's key for this request's inputs, when the cache is on.
    result_key: str | None = None
    # The engine's bookkeeping for the consumed batch this job came in (offsets to store).
    owner: Any = None
    # Experiments: the variant serving it; for a mirrored request, its role ("primary" or
    # "shadow", whose outputs go to the shadow topic and answer nobody) and the copy.
    variant: str | None = None
    role: str | None = None
    mirror: Job | None = None


class Outcome(msgspec.Struct):
    """What became of one job in a batch: outputs (one row per model output) or an error.

    ``batch_outputs`` and ``row`` point into the whole batch's outputs, so that responses
    for a batch can be postprocessed at once.
    """

    job: Job
    own_outputs: list[np.ndarray] | None = None  # set only where there is no batch
    error: RequestError | None = None
    inference_ms: float = 0.0
    batch_size: int = 0
    batch_outputs: list[np.ndarray] | None = None
    row: int = 0
    # Notes for the answer's ``parameters`` (``truncated``, say).
    parameters: dict[str, Any] | None = None

    @property
    def outputs(self) -> list[np.ndarray] | None:
        """One row per model output, sliced from the batch's on demand: the fused path
        answers a batch from ``batch_outputs`` at once and never needs them."""
        if self.own_outputs is not None or self.batch_outputs is None:
            return self.own_outputs
        return [out[self.row] for out in self.batch_outputs]


class Record(msgspec.Struct):
    """One record to publish."""

    topic: str
    key: bytes | None
    value: bytes
    headers: Headers | None


class Started(Protocol):
    """A batch's preparation and submission under way: a future of its `Pending`."""

    def done(self) -> bool: ...

    def result(self) -> Pending | None: ...


@dataclass(slots=True)
class Running:
    """One model's batch submitted to the device (``pending`` None: it failed to start).

    A batch whose inputs are prepared on the worker (tokenized, decoded) is prepared and
    submitted on the preparation thread: ``started`` is that step's future, and ``pending``
    is set from it once it is done. A batch whose images decode on torch's own threads
    (``forked``) is submitted by whoever settles it once they have: its ``started`` is done
    when they are, and the next batch of its model may start decoding then."""

    jobs: list[Job]
    pending: Pending | None
    started: Future[Pending | None] | Started | None = None
    forked: bool = False

    def prepared(self) -> bool:
        """Whether the model may take the next batch's preparation: this one's is forked
        and done (the decoder is free while the model computes)."""
        return self.forked and (self.started is None or self.started.done())

    def done(self) -> bool:
        """True once `Pipeline.finish` will not wait for the device (or the preparation)."""
        if self.started is not None:
            if not self.started.done():
                return False
            self.settle()
        return self.pending is None or self.pending.ready()

    def settle(self) -> None:
        """Wait for the preparation step, if any, and take its pending batch."""
        if self.started is not None:
            started, self.started = self.started, None
            self.pending = started.result()


# Records to publish for one source record; the source is acked once all are delivered.
Publication = tuple[Origin, list[Record]]


def now_ms() -> float:
    return time.time() * 1000.0


@dataclass(slots=True)
class Deferred:
    """The requests of a consumed batch whose features only the cold source has, waiting for
    one round trip for ``misses`` (key -> partition); ``waiting`` holds, per request, its
    index in ``origins``, model and error context, and its feature-store entry."""

    origins: Sequence[Origin]
    waiting: list[tuple[tuple[int, LoadedModel, dict[str, Any]], Any]]
    misses: dict[str, int]

    @property
    def count(self) -> int:
        return len(self.waiting)
