"""L3 cold sources behind `FeatureSource`, opened from a URL.

- ``files:///path/to/dir``: the embedded default, no server (`files.FileSource`);
- ``redis://host:port/db`` (optionally ``?prefix=features:``): Redis (`redis.RedisSource`).
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pipeline.features.base import FeatureSource

SCHEMES = ("files", "redis")


def open_source(url: str) -> FeatureSource:
    """The source a URL names; a clear error for a URL sluice cannot use."""
    scheme = urlsplit(url).scheme
    if scheme == "files":
        from pipeline.features.sources.files import FileSource

        return FileSource.from_url(url)
    if scheme == "redis":
        from pipeline.features.sources.redis import RedisSource

        return RedisSource.from_url(url)
    raise ValueError(f"feature source URL must start with one of {SCHEMES} + '://', got {url!r}")
