"""Cache-penetration protection: a Bloom filter of keys known to exist, and a short-lived
negative cache of keys found absent, so that repeated lookups of absent keys never reach
the cold source.

A Bloom filter never says "absent" for a key that was added (no false negatives); it says
"maybe present" for an absent key with probability about ``fp_rate`` once it holds
``capacity`` keys. Those false positives are what the negative cache then catches.
"""

from __future__ import annotations

import hashlib
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable


class BloomFilter:
    """``capacity`` keys at a false-positive rate of ``fp_rate``; memory fixed at creation."""

    def __init__(self, capacity: int, fp_rate: float) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        if not 0 < fp_rate < 1:
            raise ValueError(f"fp_rate must be in (0, 1), got {fp_rate!r}")
        self.capacity = capacity
        self.fp_rate = fp_rate
        # The optimal size and number of hash functions for n keys at rate p.
        self.bits = max(64, math.ceil(-capacity * math.log(fp_rate) / math.log(2) ** 2))
        self.hashes = max(1, round(self.bits / capacity * math.log(2)))
        self._array = bytearray((self.bits + 7) // 8)
        self.count = 0
        self._lock = threading.Lock()

    @property
    def size_bytes(self) -> int:
        return len(self._array)

    def _positions(self, key: str) -> list[int]:
        # Double hashing (Kirsch & Mitzenmacher): k positions from two 64-bit hashes.
        digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
        h1 = int.from_bytes(digest[:8], "little")
        h2 = int.from_bytes(digest[8:], "little") | 1
        m = self.bits
        return [(h1 + i * h2) % m for i in range(self.hashes)]

    def add(self, key: str) -> None:
        positions = self._positions(key)
        with self._lock:
            for p in positions:
                self._array[p >> 3] |= 1 << (p & 7)
            self.count += 1

    def update(self, keys: Iterable[str]) -> None:
        for key in keys:
            self.add(key)

    def __contains__(self, key: str) -> bool:
        a = self._array
        return all(a[p >> 3] & (1 << (p & 7)) for p in self._positions(key))


class NegativeCache:
    """Keys found absent in the source, remembered for ``ttl_s`` (at most ``max_entries``)."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        if ttl_s < 0:
            raise ValueError(f"ttl_s must be >= 0, got {ttl_s!r}")
        if not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._expiry: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, key: str) -> None:
        if not self.ttl_s:
            return
        with self._lock:
            self._expiry.pop(key, None)
            self._expiry[key] = time.monotonic() + self.ttl_s
            while len(self._expiry) > self.max_entries:
                self._expiry.popitem(last=False)

    def discard(self, key: str) -> None:
        with self._lock:
            self._expiry.pop(key, None)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            expires = self._expiry.get(key)
            if expires is None:
                return False
            if time.monotonic() >= expires:
                del self._expiry[key]
                return False
            return True

    def __len__(self) -> int:
        return len(self._expiry)
