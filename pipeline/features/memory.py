"""L1: an in-process LRU bounded in bytes, with a time to live per entry."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

from pipeline.features.base import Tier, TierStats, entry_bytes


class MemoryTier(Tier):
    """Least-recently-used entries go first once ``max_bytes`` would be exceeded.

    Thread-safe: the request path reads while prefetch threads write.
    """

    name = "l1"

    def __init__(self, max_bytes: int, default_ttl_s: float = 0.0) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        if default_ttl_s < 0:
            raise ValueError(f"default_ttl_s must be >= 0, got {default_ttl_s!r}")
        self.max_bytes = max_bytes
        self.default_ttl_s = default_ttl_s
        # key -> (value, expires at (monotonic s, 0 = never), size counted)
        self._entries: OrderedDict[str, tuple[bytes, float, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            value, expires, size = entry
            if expires and time.monotonic() >= expires:
                del self._entries[key]
                self._bytes -= size
                return None
            self._entries.move_to_end(key)
            return value

    def contains(self, key: str) -> bool:
        """Whether a live entry exists, without refreshing its recency."""
        with self._lock:
            entry = self._entries.get(key)
            return entry is not None and not (entry[1] and time.monotonic() >= entry[1])

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        size = entry_bytes(key, value)
        if size > self.max_bytes:
            return False
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        expires = time.monotonic() + ttl if ttl else 0.0
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]
            while self._bytes + size > self.max_bytes and self._entries:
                _, (_, _, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
            self._entries[key] = (bytes(value), expires, size)
            self._bytes += size
        return True

    def delete(self, key: str) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old[2]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def stats(self) -> TierStats:
        with self._lock:
            return TierStats(len(self._entries), self._bytes, self.max_bytes)
