"""The embedded cold source: feature records in shard files on local disk, no server.

A key lives in shard ``crc32(key) % shards``: ``shard-00007.dat``, a sequence of records
``<key length: u16><value length: u32><key><value>``, appended to; the last record of a
key wins, and an empty value with the tombstone flag deletes it. Opening a directory reads
every record header once to index where each key's value lies; a lookup is then one
positioned read of the file (``os.pread``), served from the OS page cache when warm.
"""

from __future__ import annotations

import os
import struct
import threading
import zlib
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from pipeline.features.base import FeatureSource

_RECORD = struct.Struct("<HIB")  # key length, value length, tombstone flag
DEFAULT_SHARDS = 16


def shard_of(key: str, shards: int) -> int:
    return zlib.crc32(key.encode()) % shards


class FileSource(FeatureSource):
    """Shard files in one directory (``shards.txt`` records how many)."""

    name = "files"

    def __init__(self, directory: Path, shards: int = DEFAULT_SHARDS) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "shards.txt"
        if meta.exists():
            shards = int(meta.read_text().strip())
        else:
            if not 1 <= shards <= 65536:
                raise ValueError(f"shards must be in [1, 65536], got {shards!r}")
            meta.write_text(f"{shards}\n")
        self.shards = shards
        self._lock = threading.Lock()
        self._fds: list[int] = []
        # key -> (offset of the value, its length), per shard
        self._index: list[dict[str, tuple[int, int]]] = []
        for s in range(shards):
            path = self._path(s)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
            self._fds.append(fd)
            self._index.append(self._read_index(fd))

    @classmethod
    def from_url(cls, url: str) -> FileSource:
        parts = urlsplit(url)
        path = (parts.netloc + parts.path) if parts.netloc not in ("", "localhost") else parts.path
        if not path:
            raise ValueError(f"files:// source needs a directory, got {url!r}")
        return cls(Path(path).expanduser())

    def _path(self, shard: int) -> Path:
        return self.directory / f"shard-{shard:05d}.dat"

    @staticmethod
    def _read_index(fd: int) -> dict[str, tuple[int, int]]:
        index: dict[str, tuple[int, int]] = {}
        size = os.fstat(fd).st_size
        offset = 0
        while offset + _RECORD.size <= size:
            klen, vlen, tomb = _RECORD.unpack(os.pread(fd, _RECORD.size, offset))
            key = os.pread(fd, klen, offset + _RECORD.size).decode()
            value_at = offset + _RECORD.size + klen
            if value_at + vlen > size:
                break  # a torn last record (a crash mid-append): ignored
            if tomb:
                index.pop(key, None)
            else:
                index[key] = (value_at, vlen)
            offset = value_at + vlen
        return index

    def get_many(self, keys: Iterable[str]) -> dict[str, bytes]:
        out = {}
        for key in keys:
            s = shard_of(key, self.shards)
            where = self._index[s].get(key)
            if where is not None:
                out[key] = os.pread(self._fds[s], where[1], where[0])
        return out

    def put_many(self, items: Mapping[str, bytes]) -> None:
        by_shard: dict[int, list[tuple[str, bytes]]] = {}
        for key, value in items.items():
            by_shard.setdefault(shard_of(key, self.shards), []).append((key, bytes(value)))
        with self._lock:
            for s, records in by_shard.items():
                self._append(s, records, tombstone=False)

    def delete_many(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._append(shard_of(key, self.shards), [(key, b"")], tombstone=True)

    def _append(self, shard: int, records: list[tuple[str, bytes]], tombstone: bool) -> None:
        fd = self._fds[shard]
        offset = os.fstat(fd).st_size
        chunks = []
        for key, value in records:
            k = key.encode()
            if len(k) > 0xFFFF:
                raise ValueError(f"key longer than 65535 bytes: {key[:40]!r}...")
            chunks.append(_RECORD.pack(len(k), len(value), int(tombstone)) + k + value)
        os.write(fd, b"".join(chunks))
        index = self._index[shard]
        for (key, value), chunk in zip(records, chunks, strict=True):
            if tombstone:
                index.pop(key, None)
            else:
                index[key] = (offset + len(chunk) - len(value), len(value))
            offset += len(chunk)

    def keys(self) -> Iterator[str]:
        for index in self._index:
            yield from list(index)

    def __len__(self) -> int:
        return sum(len(i) for i in self._index)

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
