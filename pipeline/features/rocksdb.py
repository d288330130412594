"""L2: RocksDB stores (through rocksdict), one per partition, backed by a changelog topic.

A key's data lives in the store of the request partition it arrives on, so it lives on
the worker that serves that key. Every write also goes to a compacted changelog topic
(``<prefix>.features-changelog``) on the same partition; when a worker is assigned a
partition it replays that partition's changelog into its store from the last offset the
store recorded, so the table survives a restart (or a lost disk) and follows the
partition to another worker on rebalance, the way Kafka Streams and faust tables do.

Each store is bounded in bytes: past the bound the oldest-written entries are evicted
(first in, first out; RocksDB keeps no access order to do LRU cheaply) and a tombstone
goes to the changelog, so the topic stays bounded too. Entries carry an absolute expiry.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import rocksdict

from pipeline.features.base import Tier, TierStats, entry_bytes

log = logging.getLogger(__name__)

_DATA = b"d"  # d<key> -> <expires epoch s: f64><seq: u64><value>
_ORDER = b"s"  # s<seq: u64 big-endian> -> <key>: write order, for eviction
_OFFSET = b"m:changelog-offset"  # the next changelog offset to replay
_HEADER = struct.Struct("<dQ")
_EXPIRY = struct.Struct("<d")
# How long a put waits for its partition's restore (the restore's own bound).
_RESTORE_WAIT_S = 60.0


def _options(memtable_bytes: int, block_cache_bytes: int) -> rocksdict.Options:
    """RocksDB's own memory bounded too: memtables and block cache."""
    opts = rocksdict.Options(raw_mode=True)
    opts.create_if_missing(True)
    opts.set_write_buffer_size(memtable_bytes)
    opts.set_max_write_buffer_number(2)
    table = rocksdict.BlockBasedOptions()
    table.set_block_cache(rocksdict.Cache(block_cache_bytes))
    opts.set_block_based_table_factory(table)
    return opts


class RocksDBTier(Tier):
    """One RocksDB store bounded in bytes, with a TTL per entry.

    ``on_evict`` is told each key the bound pushes out (the changelog writes a tombstone).
    """

    name = "l2"

    def __init__(
        self,
        path: Path,
        max_bytes: int,
        default_ttl_s: float = 0.0,
        on_evict: Callable[[str], None] | None = None,
        memtable_bytes: int = 4 << 20,
        block_cache_bytes: int = 8 << 20,
    ) -> None:
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an integer >= 1, got {max_bytes!r}")
        if default_ttl_s < 0:
            raise ValueError(f"default_ttl_s must be >= 0, got {default_ttl_s!r}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_bytes = max_bytes
        self.default_ttl_s = default_ttl_s
        self.on_evict = on_evict
        self._db: Any = rocksdict.Rdict(str(self.path), _options(memtable_bytes, block_cache_bytes))
        self._lock = threading.RLock()
        self._bytes = 0
        self._entries = 0
        self._seq = 0
        self._scan()

    def _scan(self) -> None:
        """Count what an existing store holds and where its write order ends."""
        it = self._db.iter()
        it.seek(_DATA)
        while it.valid() and it.key().startswith(_DATA):
            key, raw = it.key(), it.value()
            self._bytes += entry_bytes(key[1:].decode(), raw[_HEADER.size :])
            self._entries += 1
            it.next()
        it.seek_to_last()
        it.seek_for_prev(_ORDER + b"\xff" * 8)
        if it.valid() and it.key().startswith(_ORDER):
            self._seq = int.from_bytes(it.key()[1:], "big")
        del it

    # -- Tier -------------------------------------------------------------------------------

    def get(self, key: str) -> bytes | None:
        if self._db is None:  # closed: its partition was revoked
            return None
        raw = self._db.get(_DATA + key.encode())
        if raw is None:
            return None
        expires, _ = _HEADER.unpack_from(raw)
        if expires and time.time() >= expires:
            self._remove(key)
            return None
        return bytes(raw[_HEADER.size :])

    def put(self, key: str, value: bytes, ttl_s: float | None = None) -> bool:
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        return self.put_until(key, value, time.time() + ttl if ttl else 0.0)

    def put_until(self, key: str, value: bytes, expires: float) -> bool:
        """Store ``value`` until the epoch time ``expires`` (0: never)."""
        size = entry_bytes(key, value)
        if size > self.max_bytes:
            return False
        k = key.encode()
        with self._lock:
            if self._db is None:
                return False
            self._remove(key)
            self._evict(self.max_bytes - size)
            self._seq += 1
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.put(_DATA + k, _HEADER.pack(expires, self._seq) + value)
            batch.put(_ORDER + self._seq.to_bytes(8, "big"), k)
            self._db.write(batch)
            self._bytes += size
            self._entries += 1
        return True

    def delete(self, key: str) -> None:
        self._remove(key)

    def stats(self) -> TierStats:
        return TierStats(self._entries, self._bytes, self.max_bytes)

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # -- changelog support ------------------------------------------------------------------

    @property
    def changelog_offset(self) -> int:
        raw = self._db.get(_OFFSET)
        return int.from_bytes(raw, "big") if raw is not None else 0

    @changelog_offset.setter
    def changelog_offset(self, offset: int) -> None:
        self._db[_OFFSET] = offset.to_bytes(8, "big")

    # -- internals --------------------------------------------------------------------------

    def _remove(self, key: str) -> bool:
        k = _DATA + key.encode()
        with self._lock:
            if self._db is None:
                return False
            raw = self._db.get(k)
            if raw is None:
                return False
            _, seq = _HEADER.unpack_from(raw)
            batch = rocksdict.WriteBatch(raw_mode=True)
            batch.delete(k)
            batch.delete(_ORDER + seq.to_bytes(8, "big"))
            self._db.write(batch)
            self._bytes -= entry_bytes(key, raw[_HEADER.size :])
            self._entries -= 1
            return True

    def _evict(self, budget: int) -> None:
        """Drop the oldest-written entries until at most ``budget`` bytes are held."""
        if self._bytes <= budget:
            return
        evicted: list[str] = []
        it = self._db.iter()
        it.seek(_ORDER)
        order_keys: list[bytes] = []
        while self._bytes > budget and it.valid() and it.key().startswith(_ORDER):
            order_keys.append(it.key())
            key = it.value().decode()
            it.next()
            raw = self._db.get(_DATA + key.encode())
            if raw is None:
                continue
            self._db.delete(_DATA + key.encode())
            self._bytes -= entry_bytes(key, raw[_HEADER.size :])
            self._entries -= 1
            evicted.append(key)
        del it
        for k in order_keys:
            self._db.delete(k)
        if self.on_evict is not None:
            for key in evicted:
                self.on_evict(key)


class PartitionedTables:
    """The L2 table of one worker: a `RocksDBTier` per assigned partition + the changelog.

    ``assign`` restores partitions from the changelog before they serve; ``revoke`` flushes
    the changelog and closes their stores (their files stay: a later assignment replays
    only what it missed).
    """

    name = "l2"

    def __init__(
        self,
        root: Path,
        max_bytes_per_partition: int,
        default_ttl_s: float,
        changelog: Changelog | None,
    ) -> None:
        self.root = Path(root)
        self.max_bytes_per_partition = max_bytes_per_partition
        self.default_ttl_s = default_ttl_s
        self.changelog = changelog
        self._stores: dict[int, RocksDBTier] = {}
        # Partitions being restored from the changelog: set once their store serves.
        self._restoring: dict[int, threading.Event] = {}
        self._lock = threading.RLock()

    def owns(self, partition: int) -> bool:
        return partition in self._stores or partition in self._restoring

    @property
    def partitions(self) -> list[int]:
        return sorted(self._stores)

    def assign(self, partitions: Iterable[int]) -> None:
        """Open (and restore from the changelog) the stores of ``partitions``: `claim` them
        and restore them at once."""
        self.claim(partitions)()

    def claim(self, partitions: Iterable[int]) -> Callable[[], None]:
        """Mark ``partitions`` restoring now and return what opens and restores their stores.

        A `put` for a partition still restoring waits for it, so data fetched meanwhile (by a
        worker that serves records while it restores, as faust's may) still reaches the
        table. Every partition is marked before the first restores: the others' records may
        be served while it does. The faust engine claims on its event loop and restores on
        a thread."""
        with self._lock:
            claimed = {p: threading.Event() for p in partitions if not self.owns(p)}
            self._restoring.update(claimed)
        return lambda: self._restore(claimed)

    def _restore(self, claimed: dict[int, threading.Event]) -> None:
        try:
            for p in claimed:
                store = RocksDBTier(
                    self.root / f"p{p}",
                    self.max_bytes_per_partition,
                    self.default_ttl_s,
                    on_evict=self._tombstone(p),
                )
                try:
                    if self.changelog is not None:
                        restored = self.changelog.restore(p, store)
                        log.info("L2 partition %d: replayed %d changelog records", p, restored)
                except BaseException:
                    store.close()
                    raise
                with self._lock:
                    self._stores[p] = store
                    self._restoring.pop(p).set()
        finally:
            # A restore that failed leaves its partition and those after it unserved.
            with self._lock:
                for p, restored_event in claimed.items():
                    if self._restoring.get(p) is restored_event:
                        del self._restoring[p]
                        restored_event.set()

    def revoke(self, partitions: Iterable[int]) -> None:
        if self.changelog is not None:
            self.changelog.flush()
        for p in partitions:
            restoring = self._restoring.get(p)
            if restoring is not None:  # let it finish, then close it
                restoring.wait(_RESTORE_WAIT_S)
            with self._lock:
                store = self._stores.pop(p, None)
            if store is not None:
                store.close()

    def get(self, key: str, partition: int) -> bytes | None:
        store = self._stores.get(partition)
        return store.get(key) if store is not None else None

    def put(self, key: str, value: bytes, partition: int, ttl_s: float | None = None) -> bool:
        store = self._stores.get(partition)
        restoring = self._restoring.get(partition) if store is None else None
        if restoring is not None and restoring.wait(_RESTORE_WAIT_S):
            store = self._stores.get(partition)
        if store is None:
            return False
        ttl = self.default_ttl_s if ttl_s is None else ttl_s
        expires = time.time() + ttl if ttl else 0.0
        if not store.put_until(key, value, expires):
            return False
        if self.changelog is not None:
            self.changelog.write(partition, key, _EXPIRY.pack(expires) + value)
        return True

    def delete(self, key: str, partition: int) -> None:
        store = self._stores.get(partition)
        if store is not None:
            store.delete(key)
            if self.changelog is not None:
                self.changelog.write(partition, key, None)

    def stats(self) -> TierStats:
        stores = list(self._stores.values())
        return TierStats(
            sum(s.stats().entries for s in stores),
            sum(s.stats().bytes for s in stores),
            self.max_bytes_per_partition * max(1, len(stores)),
        )

    def close(self) -> None:
        self.revoke(list(self._stores))
        if self.changelog is not None:
            self.changelog.close()

    def _tombstone(self, partition: int) -> Callable[[str], None]:
        def evicted(key: str) -> None:
            if self.changelog is not None:
                self.changelog.write(partition, key, None)

        return evicted


class Changelog:
    """A compacted topic holding every L2 write, partitioned like the requests topic."""

    def __init__(self, settings: Any, topic: str) -> None:
        from confluent_kafka import Producer

        from pipeline.kafka import producer_config

        self.settings = settings
        self.topic = topic
        self._producer: Producer | None = Producer(producer_config(settings))

    def write(self, partition: int, key: str, value: bytes | None) -> None:
        if self._producer is None:
            raise RuntimeError(f"changelog {self.topic} is closed")
        from pipeline.kafka import produce

        produce(self._producer, self.topic, value, key.encode(), partition=partition)
        self._producer.poll(0)

    def flush(self, timeout_s: float = 30.0) -> None:
        if self._producer is not None:
            self._producer.flush(timeout_s)

    def close(self) -> None:
        if self._producer is not None:
            self.flush()
            self._producer.close()
            self._producer = None

    def restore(self, partition: int, store: RocksDBTier, timeout_s: float = 60.0) -> int:
        """Replay the partition's changelog into ``store`` from the offset it recorded."""
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        from pipeline.kafka import consumer_config, high_watermark

        self.flush()
        consumer = Consumer(
            consumer_config(self.settings, f"{self.topic}-restore", **{"enable.auto.commit": False})
        )
        replayed = 0
        try:
            low, _ = consumer.get_watermark_offsets(
                TopicPartition(self.topic, partition), timeout=10
            )
            end = high_watermark(consumer, self.topic, partition)
            start = max(store.changelog_offset, low)
            if start >= end:
                return 0
            consumer.assign([TopicPartition(self.topic, partition, start)])
            deadline = time.monotonic() + timeout_s
            position = start
            now = time.time()
            while position < end:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"changelog {self.topic}[{partition}] not replayed to {end} "
                        f"within {timeout_s}s (at {position})"
                    )
                for m in consumer.consume(500, 0.5):
                    err = m.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            raise RuntimeError(f"changelog replay: {err}")
                        continue
                    position = (m.offset() or 0) + 1
                    key = (m.key() or b"").decode()
                    value = m.value()
                    if value is None:
                        store.delete(key)
                    else:
                        (expires,) = _EXPIRY.unpack_from(value)
                        if expires and expires <= now:
                            store.delete(key)
                        else:
                            store.put_until(key, value[_EXPIRY.size :], expires)
                    replayed += 1
            store.changelog_offset = end
        finally:
            consumer.close()
        return replayed


def ensure_changelog(settings: Any, topic: str) -> None:
    """Create the compacted changelog topic, partitioned like the requests topic."""
    from confluent_kafka import KafkaException
    from confluent_kafka.admin import AdminClient

    from pipeline.kafka import confluent_config
    from pipeline.kafka.topics import new_topic

    admin = AdminClient(confluent_config(settings))
    metadata = admin.list_topics(timeout=15)
    if topic in metadata.topics:
        return
    new = new_topic(settings, metadata, topic, settings.partitions, **{"cleanup.policy": "compact"})
    for _, future in admin.create_topics([new], operation_timeout=15).items():
        try:
            future.result()
        except KafkaException as exc:
            if exc.args[0].name() != "TOPIC_ALREADY_EXISTS":
                raise RuntimeError(f"could not create topic {topic}: {exc}") from exc
    from pipeline.kafka.topics import _wait_for_leaders

    _wait_for_leaders(admin, [topic])
