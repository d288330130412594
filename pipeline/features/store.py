"""The feature store: read-through L1 (memory) -> L2 (RocksDB table) -> L3 (cold source).

A hit fills the tiers above it. Before L3, the Bloom filter of keys known to exist and the
negative cache of keys recently found absent answer "absent" without a source lookup.
The gateway enriches a consumed batch from here (`enrich_many`: one source round trip for
the batch's misses); the prefetcher fills the tiers ahead of requests through `prefetch`.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec

from pipeline.features.base import FeatureSource
from pipeline.features.bloom import BloomFilter, NegativeCache
from pipeline.features.memory import MemoryTier
from pipeline.features.rocksdb import PartitionedTables
from pipeline.protocol import codec

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.features.prefetch import Prefetcher
    from pipeline.models import LoadedModel
    from pipeline.observability.metrics import Metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FeatureSpec:
    """A model input filled from the store by the request's key (``config.json``:
    ``"features": {"input": "<input name>"}``)."""

    input: str
    datatype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, model: LoadedModel) -> FeatureSpec | None:
        try:
            raw = json.loads((model.path / "config.json").read_text()).get("features")
        except (OSError, ValueError):
            return None
        if not raw:
            return None
        name = raw.get("input") if isinstance(raw, dict) else None
        specs = {s.name: s for s in model.config.inputs}
        if name not in specs:
            raise ValueError(
                f"model {model.name}:{model.version}: features.input must name one of its "
                f"inputs {sorted(specs)}, got {name!r}"
            )
        spec = specs[name]
        return cls(spec.name, spec.datatype, spec.shape)


class FeatureStore:
    """The tiers, the penetration guards and (optionally) the prefetcher, as one lookup."""

    def __init__(
        self,
        source: FeatureSource,
        l1: MemoryTier,
        l2: PartitionedTables | None,
        metrics: Metrics,
        bloom: BloomFilter | None = None,
        negative: NegativeCache | None = None,
    ) -> None:
        self.source = source
        self.l1 = l1
        self.l2 = l2
        self.metrics = metrics
        self.bloom = bloom
        self.negative = negative
        self.prefetcher: Prefetcher | None = None
        self._specs: dict[tuple[str, str], FeatureSpec | None] = {}
        self._count = _Counter(metrics)
        self.bloom_capacity = bloom.capacity if bloom is not None else 0
        self.bloom_fp_rate = bloom.fp_rate if bloom is not None else 0.01
        self.bloom_refresh_s = 0.0
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def refresh_bloom(self) -> None:
        """Rebuild the Bloom filter from the source's keys and swap it in (keys added to
        the source since the last build become visible)."""
        bloom = BloomFilter(self.bloom_capacity, self.bloom_fp_rate)
        bloom.update(self.source.keys())
        if bloom.count > self.bloom_capacity:
            log.warning(
                "the feature source holds %d keys, more than bloom_capacity=%d: the Bloom "
                "filter's false-positive rate is above %.3g",
                bloom.count, self.bloom_capacity, self.bloom_fp_rate,
            )  # fmt: skip
        self.bloom = bloom

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.bloom_refresh_s):
            try:
                self.refresh_bloom()
            except Exception:  # noqa: BLE001 - keep the old filter; try again next time
                log.warning("rebuilding the Bloom filter failed", exc_info=True)

    @classmethod
    def from_settings(cls, settings: Settings, metrics: Metrics) -> FeatureStore:
        """The store ``settings`` describe; L2 is changelogged when there is a broker."""
        from pipeline.features.rocksdb import Changelog, ensure_changelog
        from pipeline.features.sources import open_source

        assert settings.feature_source is not None
        source = open_source(settings.feature_source)
        l1 = MemoryTier(settings.feature_l1_max_bytes, settings.feature_l1_ttl_s)
        l2 = None
        if settings.feature_l2_max_bytes:
            changelog = None
            if settings.bootstrap or (settings.cache_dir / "broker" / "state.json").exists():
                ensure_changelog(settings, settings.features_changelog_topic)
                changelog = Changelog(settings, settings.features_changelog_topic)
            l2 = PartitionedTables(
                settings.l2_tables_path,
                max(1, settings.feature_l2_max_bytes // settings.partitions),
                settings.feature_l2_ttl_s,
                changelog,
            )
        negative = NegativeCache(settings.negative_ttl_s, settings.negative_max_entries)
        store = cls(source, l1, l2, metrics, None, negative)
        if settings.bloom_capacity:
            store.bloom_capacity = settings.bloom_capacity
            store.bloom_fp_rate = settings.bloom_fp_rate
            store.bloom_refresh_s = settings.bloom_refresh_s
            store.refresh_bloom()
        if settings.prefetch_enabled:
            from pipeline.features.prefetch import Prefetcher

            store.prefetcher = Prefetcher.from_settings(settings, store, metrics)
        return store

    # -- lookups ----------------------------------------------------------------------------

    def lookup(self, key: str, partition: int) -> bytes | None:
        """The key's data from the nearest tier that has it; None if it does not exist."""
        return self.lookup_many([(key, partition)])[key]

    def lookup_many(self, items: Sequence[tuple[str, int]]) -> dict[str, bytes | None]:
        """`lookup` for the keys of a consumed batch: those in no tier come from the source
        in one round trip, so a batch waits for the source once, not once per miss.

        Nothing here waits for the prefetcher: a key it is still fetching is fetched here
        too (the duplicate costs one key in a round trip the batch makes anyway). A key the
        batch asks for twice is looked up, and counted, once.
        """
        out, misses = self.lookup_cached(items)
        if misses:
            out.update(self.fetch(misses))
        return out

    def lookup_cached(
        self, items: Sequence[tuple[str, int]]
    ) -> tuple[dict[str, bytes | None], dict[str, int]]:
        """The first half of `lookup_many`: what L1, L2 and the absent-key guards answer, and
        the keys (with their partitions) that only the source can."""
        out: dict[str, bytes | None] = {}
        misses: dict[str, int] = {}
        for key, partition in items:
            if key in out or key in misses:
                continue
            if self.prefetcher is not None:
                self.prefetcher.on_request(key)
            value = self.cached(key, partition, count=True)
            if value is not None:
                out[key] = value
            elif self.known_absent(key):
                self.metrics.cache_requests.labels("l3", "negative").inc()
                out[key] = None
            else:
                misses[key] = partition
        return out, misses

    def fetch(self, misses: Mapping[str, int]) -> dict[str, bytes | None]:
        """The second half: ``misses`` from the source in one round trip, kept in the tiers
        (None: the key does not exist). Safe on another thread, as the prefetcher's are."""
        found = self.source.get_many(list(misses))
        out: dict[str, bytes | None] = {}
        for key, partition in misses.items():
            value = found.get(key)
            self._count("l3", value is not None)
            if value is None:
                if self.negative is not None:
                    self.negative.add(key)
            else:
                self.fill(key, value, partition)
            out[key] = value
        return out

    def cached(self, key: str, partition: int, count: bool = False) -> bytes | None:
        """The key's data from L1 or L2 only (L2 hits fill L1)."""
        value = self.l1.get(key)
        if count:
            self._count("l1", value is not None)
        if value is not None:
            return value
        if self.l2 is not None and self.l2.owns(partition):
            value = self.l2.get(key, partition)
            if count:
                self._count("l2", value is not None)
            if value is not None:
                self.l1.put(key, value)
        return value

    def known_absent(self, key: str) -> bool:
        """The Bloom filter or the negative cache says the key does not exist."""
        bloom = self.bloom
        if bloom is not None and key not in bloom:
            return True
        return self.negative is not None and key in self.negative

    def prefetch(self, key: str, partition: int) -> bool | None:
        """Bring a key into L2/L1 ahead of its request: True fetched, False absent, None
        already cached (nothing done)."""
        return self.prefetch_many([(key, partition)])[key]

    def prefetch_many(self, items: list[tuple[str, int]]) -> dict[str, bool | None]:
        """`prefetch` for several keys, with one source round trip for those it needs."""
        out: dict[str, bool | None] = {}
        wanted: dict[str, int] = {}
        for key, partition in items:
            # A predicted key already cached is refreshed (L1's recency; an L2 hit is copied
            # into L1), so it is still there when its request comes.
            if self.cached(key, partition) is not None:
                out[key] = None
            elif self.known_absent(key):
                out[key] = False
            else:
                wanted[key] = partition
        found = self.source.get_many(list(wanted)) if wanted else {}
        for key, partition in wanted.items():
            value = found.get(key)
            if value is None:
                if self.negative is not None:
                    self.negative.add(key)
                out[key] = False
            else:
                self.fill(key, value, partition)
                out[key] = True
        return out

    def fill(self, key: str, value: bytes, partition: int) -> None:
        if self.l2 is not None and self.l2.owns(partition):
            self.l2.put(key, value, partition)
        self.l1.put(key, value)
        if self.bloom is not None:
            self.bloom.add(key)

    # -- the gateway ------------------------------------------------------------------------

    def spec(self, model: LoadedModel) -> FeatureSpec | None:
        k = (model.name, model.version)
        if k not in self._specs:
            self._specs[k] = FeatureSpec.of(model)
        return self._specs[k]

    def enrich_many(
        self, entries: Sequence[tuple[codec.Request, LoadedModel, int, str]]
    ) -> list[codec.Request | codec.RequestError]:
        """A consumed batch's requests with their model's feature input filled from the store
        by key, in order: each entry ``(request, model, partition, session)`` becomes its
        enriched request or the `codec.RequestError` (``unknown_key``) it fails with. The
        batch's cache misses share one source round trip (`lookup_many`)."""
        out, misses = self.enrich_cached(entries)
        try:
            values = self.fetch(misses) if misses else {}
        except Exception as exc:  # noqa: BLE001 - the source is down: its requests fail, not all
            return self.enrich_failed(out, exc)
        return self.enrich_fetched(entries, out, values)

    def enrich_cached(
        self, entries: Sequence[tuple[codec.Request, LoadedModel, int, str]]
    ) -> tuple[list[codec.Request | codec.RequestError | None], dict[str, int]]:
        """`enrich_many` without the source: None for each entry whose features only the
        source has, and those keys (with partitions) to fetch (`fetch`, then
        `enrich_fetched`)."""
        out: list[codec.Request | codec.RequestError | None] = []
        wanted: list[tuple[int, str, int, FeatureSpec]] = []
        for i, (request, model, partition, session) in enumerate(entries):
            out.append(request)
            if request.key is not None and self.prefetcher is not None:
                self.prefetcher.observe(session, request.key, partition)
            spec = self.spec(model)
            if spec is None:
                continue
            if not request.key:
                out[i] = codec.RequestError(
                    codec.UNKNOWN_KEY,
                    f"model {model.name}:{model.version} takes input {spec.input!r} from the "
                    "feature store by the request's key, and the request has no key",
                )
            elif any(t.name == spec.input for t in request.inputs):
                out[i] = codec.RequestError(
                    codec.BAD_SHAPE,
                    f"input {spec.input!r} is filled from the feature store; do not send it",
                )
            else:
                wanted.append((i, request.key, partition, spec))
        if not wanted:
            return out, {}
        values, misses = self.lookup_cached([(key, partition) for _, key, partition, _ in wanted])
        for i, key, _, spec in wanted:
            out[i] = None if key in misses else _filled(entries[i][0], spec, values[key])
        return out, misses

    def enrich_fetched(
        self,
        entries: Sequence[tuple[codec.Request, LoadedModel, int, str]],
        out: list[codec.Request | codec.RequestError | None],
        values: Mapping[str, bytes | None],
    ) -> list[codec.Request | codec.RequestError]:
        """Fill the entries `enrich_cached` left waiting from the fetched ``values``."""
        done: list[codec.Request | codec.RequestError] = []
        for (request, model, _, _), result in zip(entries, out, strict=True):
            if result is None:
                spec = self.spec(model)
                assert spec is not None and request.key is not None
                result = _filled(request, spec, values.get(request.key))
            done.append(result)
        return done

    def enrich_failed(
        self, out: list[codec.Request | codec.RequestError | None], exc: Exception
    ) -> list[codec.Request | codec.RequestError]:
        """The entries left waiting fail with ``feature_unavailable``: the source failed."""
        log.warning("feature source %s failed: %s", self.source.name, exc)
        error = codec.RequestError(
            codec.FEATURE_UNAVAILABLE,
            f"the feature source ({self.source.name}) failed: {type(exc).__name__}: {exc}",
        )
        return [error if result is None else result for result in out]

    # -- lifecycle --------------------------------------------------------------------------

    def assign(self, partitions: list[int]) -> None:
        self.claim(partitions)()

    def claim(self, partitions: list[int]) -> Callable[[], None]:
        """Mark the L2 tables of ``partitions`` restoring now; what it returns restores them
        (`rocksdb.PartitionedTables.claim`)."""
        if self.l2 is None:
            return lambda: None
        return self.l2.claim(partitions)

    def revoke(self, partitions: list[int]) -> None:
        if self.l2 is not None:
            self.l2.revoke(partitions)

    def start(self) -> FeatureStore:
        if self.prefetcher is not None:
            self.prefetcher.start()
        if self.bloom is not None and self.bloom_refresh_s > 0:
            self._refresher = threading.Thread(
                target=self._refresh_loop, name="sluice-bloom-refresh", daemon=True
            )
            self._refresher.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=30)
        if self.prefetcher is not None:
            self.prefetcher.stop()
        if self.l2 is not None:
            self.l2.close()
        self.source.close()


class _Counter:
    """``sluice_cache_requests_total{tier,result}`` children, looked up once each."""

    def __init__(self, metrics: Metrics) -> None:
        self._children: dict[tuple[str, bool], Any] = {}
        self._metrics = metrics
        self._lock = threading.Lock()

    def __call__(self, tier: str, hit: bool) -> None:
        child = self._children.get((tier, hit))
        if child is None:
            with self._lock:
                child = self._metrics.cache_requests.labels(tier, "hit" if hit else "miss")
                self._children[(tier, hit)] = child
        child.inc()


def _filled(
    request: codec.Request, spec: FeatureSpec, value: bytes | None
) -> codec.Request | codec.RequestError:
    """``request`` with its feature input ``value``, or ``unknown_key`` without one."""
    if value is None:
        return codec.RequestError(codec.UNKNOWN_KEY, f"no features for key {request.key!r}")
    tensor = codec.Tensor(spec.input, spec.datatype, list(spec.shape), value)  # type: ignore[arg-type]
    return msgspec.structs.replace(request, inputs=[*request.inputs, tensor])
