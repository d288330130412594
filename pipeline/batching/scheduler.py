"""Micro-batching, in one place: when a batch is flushed, what goes in it, and its shape.

The core, `Scheduler`, is pure and clock-injected: per-key (per-model) queues, flushed when
full, ``max_delay_s`` after the first request of the batch, or early when the earliest
deadline would otherwise be missed given the model's estimated batch time (an EWMA per
model and batch-size bucket). With an adaptive window (the default), a queue whose model is
idle is flushed at once: the window only fills while the model is busy with the batch
before, so a lone request never waits for company that is not coming, and under load the
batches grow as large as they did with the fixed window. Requests whose deadline has
passed come out as ``expired`` and are never computed. The batch engine drives a
`Scheduler` from its consume loop; the faust engine's async `Batcher` wraps one (with the
fixed window: its handler runs on the event loop, so nothing arrives while a batch runs).
Shape buckets (`bucket_for`, `pad_sequences`) live here too, so that warm-up covers every
shape a batch can have.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

import numpy as np

T = TypeVar("T")
K = TypeVar("K", bound=Hashable)
log = logging.getLogger(__name__)

# Weight of the newest observation in the batch-time EWMA.
EWMA_ALPHA = 0.2


def default_buckets(max_size: int) -> tuple[int, ...]:
    """Powers of two up to ``max_size``, and ``max_size`` itself."""
    if not isinstance(max_size, int) or isinstance(max_size, bool) or max_size < 1:
        raise ValueError(f"max_size must be an integer >= 1, got {max_size!r}")
    out = []
    b = 1
    while b < max_size:
        out.append(b)
        b *= 2
    out.append(max_size)
    return tuple(out)


def check_buckets(name: str, buckets: Sequence[int]) -> tuple[int, ...]:
    """Buckets as a strictly increasing tuple of positive ints; ValueError naming the value."""
    values = tuple(buckets)
    if (
        not values
        or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in values)
        or any(a >= b for a, b in zip(values, values[1:], strict=False))
    ):
        raise ValueError(
            f"{name} must be a non-empty, strictly increasing list of integers >= 1, "
            f"got {list(buckets)!r}"
        )
    return values


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``n``; ValueError if none does."""
    for b in buckets:
        if b >= n:
            return b
    raise ValueError(f"{n} is larger than the largest bucket {buckets[-1]} of {list(buckets)}")


def pad_sequences(
    rows: Sequence[np.ndarray],
    buckets: Sequence[int],
    pad: float = 0,
    axis: int = 0,
    out: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Stack variable-length rows (varying along ``axis``) padded to a sequence bucket.

    Returns the padded batch and its attention mask (1 for data, 0 for padding), of shape
    ``(rows, bucket)``. ``out``, when given, is filled in place: it may have more rows than
    ``rows`` (a batch-size bucket), which are padded whole.
    """
    lengths = [r.shape[axis] for r in rows]
    length = bucket_for(max(lengths), buckets)
    if out is None:
        shape = list(rows[0].shape)
        shape[axis] = length
        out = np.empty((len(rows), *shape), dtype=rows[0].dtype)
    if out.shape[axis + 1] != length:
        raise ValueError(f"out has length {out.shape[axis + 1]} along axis {axis}, not {length}")
    out[...] = pad
    mask = np.zeros((out.shape[0], length), dtype=np.int64)
    for i, (r, n) in enumerate(zip(rows, lengths, strict=True)):
        index: list[Any] = [i] + [slice(None)] * r.ndim
        index[axis + 1] = slice(0, n)
        out[tuple(index)] = r
        mask[i, :n] = 1
    return out, mask


@dataclass(frozen=True)
class BatchPolicy:
    """How one key's queue is flushed.

    Args:
        max_batch_size: flush as soon as this many requests wait.
        max_delay_s: flush this long after the first request of the batch arrived.
        batch_buckets: batch sizes a batch is padded to (default: powers of two up to
            ``max_batch_size``).
        time_budget_s: cap a batch at the largest bucket whose estimated time fits.
        default_ttl_s: the deadline of requests that carry none, only to warn when
            ``max_delay_s`` is longer.
        adaptive: flush at once while the model is idle (`Scheduler.poll`'s ``idle``).
    """

    max_batch_size: int
    max_delay_s: float
    batch_buckets: tuple[int, ...] = ()
    time_budget_s: float | None = None
    default_ttl_s: float | None = field(default=None, compare=False)
    adaptive: bool = False

    def __post_init__(self) -> None:
        n = self.max_batch_size
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {n!r}")
        d = self.max_delay_s
        if not isinstance(d, (int, float)) or isinstance(d, bool) or not 0 <= d < math.inf:
            raise ValueError(f"max_delay_s must be a number >= 0, got {d!r}")
        b = self.time_budget_s
        if b is not None and (not isinstance(b, (int, float)) or isinstance(b, bool) or b <= 0):
            raise ValueError(f"time_budget_s must be a number of seconds > 0, got {b!r}")
        if not self.batch_buckets:
            object.__setattr__(self, "batch_buckets", default_buckets(n))
        buckets = check_buckets("batch_buckets", self.batch_buckets)
        object.__setattr__(self, "batch_buckets", buckets)
        if n not in buckets:
            warnings.warn(
                f"max_batch_size {n} is not one of the batch_buckets {list(buckets)}: "
                + (
                    f"batches are capped at the largest bucket, {buckets[-1]}"
                    if n > buckets[-1]
                    else f"full batches are padded to {bucket_for(n, buckets)}"
                ),
                stacklevel=3,
            )
        ttl = self.default_ttl_s
        if ttl and d > ttl:
            warnings.warn(
                f"max_delay_s {d} is longer than the default TTL {ttl} s: a lone request "
                "would expire before its batch is flushed",
                stacklevel=3,
            )

    @property
    def cap(self) -> int:
        """The largest batch, before any time budget."""
        return min(self.max_batch_size, self.batch_buckets[-1])


@dataclass
class Flush(Generic[K, T]):
    """A batch to run (``items``, padded to ``bucket``) and expired requests to answer."""

    key: K
    items: list[T]
    expired: list[T]
    bucket: int


# A queued request: (sequence number, item, arrived_s, deadline_s); tuples, as the batch
# engine queues tens of thousands a second.
_SEQ: Final = 0
_ITEM: Final = 1
_ARRIVED: Final = 2
_DEADLINE: Final = 3


class _Queue(Generic[T]):
    __slots__ = ("policy", "entries", "min_deadline_s")

    def __init__(self, policy: BatchPolicy) -> None:
        self.policy = policy
        self.entries: deque[tuple[int, T, float, float]] = deque()
        self.min_deadline_s = math.inf

    def recompute(self) -> None:
        self.min_deadline_s = min((e[_DEADLINE] for e in self.entries), default=math.inf)


class Scheduler(Generic[K, T]):
    """Per-key queues and the rules for flushing them; no threads, no I/O, its own clock.

    Args:
        policy_for: the `BatchPolicy` of a key, asked once, on the key's first request.
        clock: seconds; arrivals and deadlines are on the same clock.
        max_pending: bound on the requests held across all queues (`full`).
    """

    def __init__(
        self,
        policy_for: Callable[[K], BatchPolicy],
        clock: Callable[[], float] = time.monotonic,
        max_pending: int = 4096,
    ) -> None:
        if not isinstance(max_pending, int) or isinstance(max_pending, bool) or max_pending < 1:
            raise ValueError(f"max_pending must be an integer >= 1, got {max_pending!r}")
        self.policy_for = policy_for
        self.clock = clock
        self.max_pending = max_pending
        self._queues: dict[K, _Queue[T]] = {}
        self._ewma: dict[tuple[K, int], float] = {}
        self._seq = 0
        self.pending = 0

    @property
    def full(self) -> bool:
        return self.pending >= self.max_pending

    def add(
        self, key: K, item: T, deadline_s: float | None = None, arrived_s: float | None = None
    ) -> None:
        """Queue ``item`` under ``key``; the window counts from ``arrived_s`` (default: now).

        Raises:
            OverflowError: ``max_pending`` requests are held already (callers check `full`).
        """
        if self.pending >= self.max_pending:
            raise OverflowError(f"the batcher holds max_pending={self.max_pending} requests")
        queue = self._queues.get(key)
        if queue is None:
            queue = self._queues[key] = _Queue(self.policy_for(key))
        arrived = self.clock() if arrived_s is None else arrived_s
        deadline = math.inf if deadline_s is None else deadline_s
        self._seq += 1
        queue.entries.append((self._seq, item, arrived, deadline))
        if deadline < queue.min_deadline_s:
            queue.min_deadline_s = deadline
        self.pending += 1

    # -- batch-time estimates ---------------------------------------------------------------

    def observe(self, key: K, bucket: int, seconds: float) -> None:
        """Fold one measured batch time into the key's EWMA for that batch bucket."""
        k = (key, bucket)
        old = self._ewma.get(k)
        self._ewma[k] = seconds if old is None else old + EWMA_ALPHA * (seconds - old)

    def estimate(self, key: K, bucket: int) -> float | None:
        """The estimated time of a batch of ``bucket``; scaled from a neighbour; None if unknown."""
        exact = self._ewma.get((key, bucket))
        if exact is not None:
            return exact
        known = sorted((b, s) for (k, b), s in self._ewma.items() if k == key)
        if not known:
            return None
        for b, s in known:
            if b >= bucket:
                return s  # a larger batch's time bounds this one's
        b, s = known[-1]
        return s * bucket / b

    def cap(self, key: K, policy: BatchPolicy) -> int:
        """The key's largest batch: its policy's, lowered to fit its time budget."""
        cap = policy.cap
        if policy.time_budget_s is None:
            return cap
        fits = [
            b
            for b in policy.batch_buckets
            if b <= cap and (self.estimate(key, b) or 0.0) <= policy.time_budget_s
        ]
        return max(fits) if fits else policy.batch_buckets[0]

    # -- flushing ---------------------------------------------------------------------------

    def _urgency_s(self, key: K, queue: _Queue[T]) -> float:
        """When the queue is due by time: max delay from its first request, or earlier when
        its earliest deadline minus the estimated batch time comes first."""
        policy = queue.policy
        due = queue.entries[0][_ARRIVED] + policy.max_delay_s
        if queue.min_deadline_s < math.inf:
            bucket = bucket_for(min(len(queue.entries), policy.cap), policy.batch_buckets)
            est = self.estimate(key, bucket) or 0.0
            due = min(due, queue.min_deadline_s - est)
        return due

    def _due_s(self, key: K, queue: _Queue[T]) -> float:
        """When the queue must be flushed (-inf: now, it is full)."""
        if len(queue.entries) >= self.cap(key, queue.policy):
            return -math.inf
        return self._urgency_s(key, queue)

    def next_deadline(self) -> float | None:
        """The clock time at which `poll` will next have something; None when all are empty."""
        times = [
            min(self._due_s(k, q), q.min_deadline_s) for k, q in self._queues.items() if q.entries
        ]
        return min(times) if times else None

    def poll(
        self, force: bool = False, idle: Callable[[K], bool] | None = None
    ) -> Flush[K, T] | None:
        """The most urgent batch that is due (any non-empty one with ``force``), or None.

        Expired requests are split out first: a returned `Flush` may hold only expired
        requests. Among due queues, the most urgent goes first (EDF on each queue's max-delay
        or deadline time), so a busy model cannot starve one whose requests waited longer.
        ``idle(key)`` says whether a key's model has nothing running: an adaptive queue is
        then due at once.
        """
        now = self.clock()
        best: tuple[float, K] | None = None
        for key, queue in self._queues.items():
            if not queue.entries:
                continue
            if queue.min_deadline_s <= now:
                return self._take_expired(key, queue, now)
            if (
                force
                or (idle is not None and queue.policy.adaptive and idle(key))
                or self._due_s(key, queue) <= now
            ):
                # Ranked by time-based urgency, not fullness: a model that is always full
                # takes turns with one whose requests have waited longer.
                urgency = self._urgency_s(key, queue)
                if best is None or urgency < best[0]:
                    best = (urgency, key)
        if best is None:
            return None
        key = best[1]
        queue = self._queues[key]
        cap = self.cap(key, queue.policy)
        entries = queue.entries
        if len(entries) <= cap:
            taken = list(entries)
            entries.clear()
        elif queue.min_deadline_s < math.inf:
            # Earliest deadline first; ties (and no deadline) in arrival order.
            chosen = sorted(entries, key=lambda e: (e[_DEADLINE], e[_SEQ]))[:cap]
            seqs = {e[_SEQ] for e in chosen}
            taken = sorted(chosen)  # by sequence number: arrival order
            queue.entries = deque(e for e in entries if e[_SEQ] not in seqs)
        else:
            taken = [entries.popleft() for _ in range(cap)]
        queue.recompute()
        self.pending -= len(taken)
        items = [e[_ITEM] for e in taken]
        return Flush(key, items, [], bucket_for(len(items), queue.policy.batch_buckets))

    def _take_expired(self, key: K, queue: _Queue[T], now: float) -> Flush[K, T]:
        expired = [e[_ITEM] for e in queue.entries if e[_DEADLINE] <= now]
        queue.entries = deque(e for e in queue.entries if e[_DEADLINE] > now)
        queue.recompute()
        self.pending -= len(expired)
        return Flush(key, [], expired, 0)

    def drain(self) -> list[Flush[K, T]]:
        """Every queued request, as flushes (expired split out), emptying the scheduler."""
        out = []
        while (flush := self.poll(force=True)) is not None:
            out.append(flush)
        return out
