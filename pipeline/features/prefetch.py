"""Predictive prefetch: learn which keys come next from the request stream and pull their
data from the cold source into L2/L1 before the requests arrive.

`Predictor` keeps first-order transitions between consecutive keys of a session (with
exponentially decayed counts, so it follows a changing workload) and the decayed
popularity of each key, both in bounded tables. `Prefetcher` feeds its predictions to a
few threads through a bounded queue: the request path only enqueues (dropping work when
the queue is full, never waiting), and the threads fetch under a token-bucket budget of
lookups per second.

Precision (prefetched keys a request then used / prefetched keys) is
``sluice_prefetch_total{result="used"|"wasted"}``; coverage (requests whose data a
prefetch had brought / requests) is ``sluice_prefetch_coverage_total{result}``.

It runs inside the worker, on its own threads, rather than as a separate consumer group:
L1 is process memory and L2 holds the partitions this worker is assigned, so only the
worker that serves a key can warm them for it.
"""

from __future__ import annotations

import heapq
import logging
import math
import queue
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.observability.metrics import Metrics

log = logging.getLogger(__name__)


class Predictor:
    """Next-key predictions from per-session transitions and decayed popularity.

    Args:
        max_keys: keys with transition and popularity entries kept (least recently seen
            go first); ``max_keys`` sessions are remembered too.
        fanout: successors kept per key (the weakest goes when a new one arrives).
        half_life_events: requests after which a count weighs half as much.
    """

    def __init__(self, max_keys: int, fanout: int = 16, half_life_events: float = 50_000) -> None:
        if not isinstance(max_keys, int) or max_keys < 1:
            raise ValueError(f"max_keys must be an integer >= 1, got {max_keys!r}")
        if not isinstance(fanout, int) or fanout < 1:
            raise ValueError(f"fanout must be an integer >= 1, got {fanout!r}")
        self.max_keys = max_keys
        self.fanout = fanout
        self._growth = 2.0 ** (1.0 / half_life_events)
        # Decay without touching every entry: new weight is added at an ever growing scale.
        self._scale = 1.0
        self._next: OrderedDict[str, dict[str, float]] = OrderedDict()
        # key -> [decayed count, partition it arrived on]
        self._seen: OrderedDict[str, list[Any]] = OrderedDict()
        self._last: OrderedDict[str, str] = OrderedDict()
        self._lock = threading.Lock()

    def observe(self, session: str, key: str, partition: int) -> None:
        with self._lock:
            self._scale *= self._growth
            if self._scale > 1e100:
                self._rescale()
            w = self._scale
            seen = self._seen.get(key)
            if seen is None:
                self._seen[key] = [w, partition]
                if len(self._seen) > self.max_keys:
                    self._seen.popitem(last=False)
            else:
                seen[0] += w
                seen[1] = partition
                self._seen.move_to_end(key)
            prev = self._last.pop(session, None)
            self._last[session] = key
            if len(self._last) > self.max_keys:
                self._last.popitem(last=False)
            if prev is None:
                return
            successors = self._next.get(prev)
            if successors is None:
                successors = self._next[prev] = {}
                if len(self._next) > self.max_keys:
                    self._next.popitem(last=False)
            else:
                self._next.move_to_end(prev)
            if key in successors:
                successors[key] += w
            else:
                if len(successors) >= self.fanout:
                    del successors[min(successors, key=successors.__getitem__)]
                successors[key] = w

    def predict(self, key: str, depth: int = 1, min_share: float = 0.02) -> list[tuple[str, int]]:
        """Keys likely to follow ``key`` (with their partitions), most likely first.

        The successors holding at least ``min_share`` of ``key``'s transitions, then the
        likeliest successor's successors, and so on, ``depth`` steps ahead.
        """
        out: list[tuple[str, int]] = []
        chosen = {key}
        with self._lock:
            current = key
            for _ in range(depth):
                successors = self._next.get(current)
                if not successors:
                    break
                total = sum(successors.values())
                ranked = sorted(successors.items(), key=lambda kv: -kv[1])
                for k, w in ranked:
                    if w < min_share * total or k in chosen:
                        continue
                    seen = self._seen.get(k)
                    if seen is not None:
                        chosen.add(k)
                        out.append((k, seen[1]))
                current = ranked[0][0]
        return out

    def hot(self, n: int) -> list[tuple[str, int]]:
        """The ``n`` most popular keys (decayed counts), with their partitions."""
        with self._lock:
            top = heapq.nlargest(n, self._seen.items(), key=lambda kv: kv[1][0])
        return [(k, v[1]) for k, v in top]

    def _rescale(self) -> None:
        s = self._scale
        for successors in self._next.values():
            for k in successors:
                successors[k] /= s
        for v in self._seen.values():
            v[0] /= s
        self._scale = 1.0


class TokenBucket:
    """``rate_per_s`` tokens a second, at most ``burst`` saved up."""

    def __init__(self, rate_per_s: float, burst: float | None = None) -> None:
        if not rate_per_s > 0:
            raise ValueError(f"rate_per_s must be > 0, got {rate_per_s!r}")
        self.rate = float(rate_per_s)
        self.burst = max(1.0, burst if burst is not None else self.rate / 10.0)
        self._tokens = self.burst
        self._at = time.monotonic()
        self._lock = threading.Lock()

    def take(self, stop: threading.Event) -> bool:
        """Wait for a token (False if ``stop`` is set meanwhile)."""
        while not stop.is_set():
            with self._lock:
                now = time.monotonic()
                self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
                self._at = now
                if self._tokens >= 1.0:
                    self._tokens -= 1.0
                    return True
                wait_s = (1.0 - self._tokens) / self.rate
            stop.wait(min(wait_s, 0.1))
        return False


class _Store(Protocol):
    def prefetch_many(self, items: list[tuple[str, int]]) -> dict[str, bool | None]: ...


class Prefetcher:
    """Asynchronous prefetch of predicted keys, with bounded concurrency and budget."""

    def __init__(
        self,
        store: _Store,
        metrics: Metrics,
        predictor: Predictor,
        concurrency: int = 4,
        budget_per_s: float = 500.0,
        queue_size: int = 1024,
        depth: int = 2,
        min_share: float = 0.02,
        hot_keys: int = 0,
        hot_interval_s: float = 1.0,
        track_max: int = 100_000,
        track_ttl_s: float = 300.0,
        batch_max: int = 16,
    ) -> None:
        if not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
        if not isinstance(queue_size, int) or queue_size < 1:
            raise ValueError(f"queue_size must be an integer >= 1, got {queue_size!r}")
        self.store = store
        self.metrics = metrics
        self.predictor = predictor
        self.concurrency = concurrency
        self.bucket = TokenBucket(budget_per_s)
        self.depth = depth
        self.min_share = min_share
        self.hot_keys = hot_keys
        self.hot_interval_s = hot_interval_s
        self.track_max = track_max
        self.track_ttl_s = track_ttl_s
        self.batch_max = batch_max
        self._queue: queue.Queue[tuple[str, int]] = queue.Queue(queue_size)
        self._pending: set[str] = set()
        # Keys a prefetch brought in and no request has used yet -> when.
        self._prefetched: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        m = metrics
        self._used = m.prefetch.labels("used")
        self._wasted = m.prefetch.labels("wasted")
        self._covered = m.prefetch_coverage.labels("covered")
        self._uncovered = m.prefetch_coverage.labels("uncovered")
        self._skipped = {
            r: m.prefetch_skipped.labels(r) for r in ("queue_full", "cached", "absent", "error")
        }

    @classmethod
    def from_settings(cls, settings: Settings, store: _Store, metrics: Metrics) -> Prefetcher:
        return cls(
            store,
            metrics,
            Predictor(settings.prefetch_max_keys, fanout=settings.prefetch_fanout),
            concurrency=settings.prefetch_concurrency,
            budget_per_s=settings.prefetch_budget_per_s,
            queue_size=settings.prefetch_queue_size,
            depth=settings.prefetch_depth,
            min_share=settings.prefetch_min_share,
            hot_keys=settings.prefetch_hot_keys,
        )

    # -- the request path: never blocks ------------------------------------------------------

    def observe(self, session: str, key: str, partition: int) -> None:
        """Learn from a request and queue the keys predicted to follow it."""
        self.predictor.observe(session, key, partition)
        for k, p in self.predictor.predict(key, self.depth, self.min_share):
            self.submit(k, p)

    def submit(self, key: str, partition: int) -> bool:
        with self._lock:
            if key in self._pending or key in self._prefetched:
                return False
            try:
                self._queue.put_nowait((key, partition))
            except queue.Full:
                self._skipped["queue_full"].inc()
                return False
            self._pending.add(key)
        return True

    def on_request(self, key: str) -> bool:
        """Count a request for ``key``: True if a prefetch had brought its data."""
        with self._lock:
            hit = self._prefetched.pop(key, None) is not None
        if hit:
            self._used.inc()
            self._covered.inc()
        else:
            self._uncovered.inc()
        return hit

    # -- the prefetch threads ---------------------------------------------------------------

    def start(self) -> Prefetcher:
        for i in range(self.concurrency):
            t = threading.Thread(target=self._work, name=f"sluice-prefetch-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        t = threading.Thread(target=self._housekeeping, name="sluice-prefetch-hot", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        self._threads = []

    def _work(self) -> None:
        while not self._stop.is_set():
            try:
                items = [self._queue.get(timeout=0.1)]
            except queue.Empty:
                continue
            # What else is queued goes in the same source round trip (one MGET for Redis).
            while len(items) < self.batch_max:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            try:
                for _ in items:
                    if not self.bucket.take(self._stop):
                        return
                fetched = self.store.prefetch_many(items)
            except Exception:  # noqa: BLE001 - a failed prefetch is only a later miss
                log.warning("prefetch of %d keys failed", len(items), exc_info=True)
                self._skipped["error"].inc(len(items))
                continue
            finally:
                with self._lock:
                    for key, _ in items:
                        self._pending.discard(key)
            for key, result in fetched.items():
                if result is None:
                    self._skipped["cached"].inc()
                elif not result:
                    self._skipped["absent"].inc()
                else:
                    self._track(key)

    def _track(self, key: str) -> None:
        with self._lock:
            self._prefetched[key] = time.monotonic()
            self._prefetched.move_to_end(key)
            overflow = len(self._prefetched) - self.track_max
            for _ in range(max(0, overflow)):
                self._prefetched.popitem(last=False)
        if overflow > 0:
            self._wasted.inc(overflow)

    def _housekeeping(self) -> None:
        """Expire unused prefetches as wasted; warm the hottest keys (popularity)."""
        while not self._stop.wait(self.hot_interval_s):
            cutoff = time.monotonic() - self.track_ttl_s
            expired = 0
            with self._lock:
                while self._prefetched:
                    key, at = next(iter(self._prefetched.items()))
                    if at > cutoff:
                        break
                    self._prefetched.popitem(last=False)
                    expired += 1
            if expired:
                self._wasted.inc(expired)
            if self.hot_keys:
                for k, p in self.predictor.hot(self.hot_keys):
                    self.submit(k, p)

    def wait_idle(self, timeout_s: float = 10.0) -> bool:
        """Wait until no prefetch is queued or running (for tests and the bench)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not self._pending:
                    return True
            time.sleep(0.005)
        return False

    def stats(self) -> dict[str, float]:
        """Precision and coverage so far, from the metrics' own counters."""
        used, wasted = _value(self._used), _value(self._wasted)
        covered, uncovered = _value(self._covered), _value(self._uncovered)
        with self._lock:
            outstanding = len(self._prefetched)
        prefetched = used + wasted + outstanding
        return {
            "prefetched": prefetched,
            "precision": used / prefetched if prefetched else math.nan,
            "coverage": covered / (covered + uncovered) if covered + uncovered else math.nan,
        }


def _value(child: Any) -> float:
    try:
        return float(child._value.get())
    except AttributeError:  # no-op metrics
        return 0.0
