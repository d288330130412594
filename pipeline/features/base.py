"""The cache tier interface (L1 memory, L2 RocksDB) and the cold source interface (L3).

Keys are strings (a request's ``key``), values are bytes (for features: the raw
little-endian bytes of the tensor a model's feature input takes). Every tier is bounded
in bytes by configuration and gives each entry a time to live.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class TierStats:
    """What a tier holds against its bound."""

    entries: int
    bytes: int
    max_bytes: int


class Tier(abc.ABC):
    """One cache tier: get, get_many, put with a TTL, delete, and its byte bound."""

    name: str = "tier"

    @abc.abstractmethod
    def get(self, key: str) -> bytes | None:
        """The live value for ``key``, or None (absent or expired)."""

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The live values of those ``keys`` that are present."""
        out = {}
        for key in keys:
            value = self.get(key)
            if value is not None:
                out[key] = value
        return out

    @abc.abstractmethod
    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        """Store ``value`` for ``ttl_s`` seconds (None: the tier's default; 0: no expiry).

        Returns False when the entry cannot fit the tier's byte bound at all.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Forget ``key`` (no error when absent)."""

    @abc.abstractmethod
    def stats(self) -> TierStats:
        """Entries and bytes held, against the configured bound."""

    def close(self) -> None:  # noqa: B027 - optional: most tiers hold nothing open
        """Release what the tier holds open (files, connections)."""


class FeatureSource(abc.ABC):
    """The cold source (L3) that holds every key's data: slow, complete, authoritative."""

    name: str = "source"

    @abc.abstractmethod
    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        """The values of those ``keys`` that exist (one round trip where the source can)."""

    def get(self, key: str) -> bytes | None:
        return self.get_many([key]).get(key)

    @abc.abstractmethod
    def put_many(self, items: Mapping[str, bytes]) -> None:
        """Write (or overwrite) values: how data is loaded into the source."""

    @abc.abstractmethod
    def keys(self) -> Iterator[str]:
        """Every key the source holds (to build the Bloom filter of keys known to exist)."""

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections and files."""


class WrappedSource(FeatureSource):
    """A source that hands every call to ``inner``: subclasses override what they measure
    or slow down (the benchmark's delayed source, tests' counting ones)."""

    def __init__(self, inner: FeatureSource) -> None:
        self.inner = inner
        self.name = inner.name

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        return self.inner.get_many(keys)

    def put_many(self, items: Mapping[str, bytes]) -> None:
        self.inner.put_many(items)

    def keys(self) -> Iterator[str]:
        return self.inner.keys()

    def close(self) -> None:
        self.inner.close()


def entry_bytes(key: str, value: bytes) -> int:
    """What an entry counts against a byte bound: its key and value plus a fixed overhead
    for the bookkeeping around it (dict slot, tuple, expiry)."""
    return len(key) + len(value) + ENTRY_OVERHEAD_BYTES


ENTRY_OVERHEAD_BYTES = 64
