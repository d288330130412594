"""A networked cold source: Redis, through redis-py (one MGET per lookup batch)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis as redis_py

from pipeline.features.base import FeatureSource


class RedisSource(FeatureSource):
    """Values under ``<prefix><key>`` as plain Redis strings (``SET``/``MGET``)."""

    name = "redis"

    def __init__(self, client: Any, prefix: str = "") -> None:
        self.client = client
        self.prefix = prefix

    @classmethod
    def from_url(cls, url: str) -> RedisSource:
        """``redis://host:port/db[?prefix=features:]``; other query options go to redis-py."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        prefix = query.pop("prefix", "")
        clean = urlunsplit(parts._replace(query=urlencode(query)))
        try:
            client = redis_py.Redis.from_url(clean, socket_timeout=5, socket_connect_timeout=5)
        except ValueError as exc:
            raise ValueError(f"feature source URL {url!r}: {exc}") from None
        return cls(client, prefix)

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        keys = list(keys)
        if not keys:
            return {}
        values = self.client.mget([self.prefix + k for k in keys])
        return {k: bytes(v) for k, v in zip(keys, values, strict=True) if v is not None}

    def put_many(self, items: Mapping[str, bytes]) -> None:
        if items:
            self.client.mset({self.prefix + k: v for k, v in items.items()})

    def keys(self) -> Iterator[str]:
        n = len(self.prefix)
        for raw in self.client.scan_iter(match=_escape(self.prefix) + "*", count=1000):
            yield raw.decode()[n:]

    def close(self) -> None:
        self.client.close()


def _escape(prefix: str) -> str:
    """A literal prefix in a Redis glob pattern."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in prefix)
