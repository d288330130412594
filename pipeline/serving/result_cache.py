"""The result cache: a model's outputs for an input, so a repeated request is answered at
the gateway without touching the model.

Keyed by a hash of the model's name, its version and the request's input tensors (after
feature enrichment), so a new model version never sees an older version's entries; each
entry also records the model and version it came from, and a lookup checks them, so not
even a hash collision can serve another version's answer. Held in L1 (memory) and L2
(a local RocksDB store), each bounded in bytes, with a TTL.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec
import numpy as np

from pipeline.features.memory import MemoryTier
from pipeline.features.rocksdb import RocksDBTier

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.observability.metrics import Metrics
    from pipeline.protocol import codec


class _Entry(msgspec.Struct, array_like=True):
    model: str
    version: str
    # (name, numpy dtype name, shape, raw bytes) per output, one request's row
    outputs: list[tuple[str, str, list[int], bytes]]


_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(_Entry)


class ResultCache:
    """Model outputs by (model, version, inputs) in L1 and L2."""

    def __init__(
        self, l1: MemoryTier, l2: RocksDBTier | None, ttl_s: float, metrics: Metrics
    ) -> None:
        self.l1 = l1
        self.l2 = l2
        self.ttl_s = ttl_s
        self.metrics = metrics
        self._hit = metrics.cache_requests.labels("result", "hit")
        self._miss = metrics.cache_requests.labels("result", "miss")

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> ResultCache:
        ttl = settings.result_cache_ttl_s
        l2 = None
        if settings.result_cache_l2_max_bytes:
            path = Path(settings.l2_tables_path).parent / (
                Path(settings.l2_tables_path).name + "-results"
            )
            l2 = RocksDBTier(path, settings.result_cache_l2_max_bytes, ttl)
        return cls(MemoryTier(settings.result_cache_l1_max_bytes, ttl), l2, ttl, metrics)

    @staticmethod
    def key(model: str, version: str, inputs: list[codec.Tensor]) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(f"{len(model)}:{model}{len(version)}:{version}".encode())
        for t in sorted(inputs, key=lambda t: t.name):
            h.update(_ENCODER.encode((t.name, t.datatype, t.shape, t.data)))
        return h.hexdigest()

    def get(self, key: str, model: str, version: str) -> list[tuple[str, np.ndarray]] | None:
        """The cached outputs (name, row array) for ``key``, only if made by that version."""
        raw = self.l1.get(key)
        if raw is None and self.l2 is not None:
            raw = self.l2.get(key)
            if raw is not None:
                self.l1.put(key, raw)
        entry = _DECODER.decode(raw) if raw is not None else None
        if entry is None or entry.model != model or entry.version != version:
            self._miss.inc()
            return None
        self._hit.inc()
        return [
            (name, np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape))
            for name, dtype, shape, data in entry.outputs
        ]

    def put(
        self, key: str, model: str, version: str, outputs: list[tuple[str, np.ndarray]]
    ) -> None:
        rows = [
            (name, a.dtype.name, list(a.shape), np.ascontiguousarray(a).tobytes())
            for name, a in outputs
        ]
        raw = _ENCODER.encode(_Entry(model, version, rows))
        self.l1.put(key, raw)
        if self.l2 is not None:
            self.l2.put(key, raw)

    def close(self) -> None:
        if self.l2 is not None:
            self.l2.close()
