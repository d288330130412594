"""The lag monitor: a worker's own consumer group sampled on a thread (through
`pipeline.kafka.lag.describe`) and exported as gauges."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import Any

from pipeline.config import Settings
from pipeline.kafka.lag import PartitionLag, admin_client, describe
from pipeline.observability.metrics import Metrics

log = logging.getLogger(__name__)


class LagMonitor:
    """Samples a worker's consumer group every ``interval_s`` on a daemon thread.

    Exports ``sluice_consumer_lag``, ``sluice_consumer_time_lag_seconds`` and
    ``sluice_consumer_committed_offset`` per group, topic and partition (labels bounded by
    the partitions of the worker's own topics); series of partitions that disappear are
    removed.
    """

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        groups: Sequence[str],
        topics: Sequence[str],
        interval_s: float | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.groups = list(groups)
        self.topics = list(topics)
        self.interval_s = settings.lag_interval_s if interval_s is None else interval_s
        self._admin: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._exported: set[tuple[str, str, str]] = set()
        self._latest: list[PartitionLag] = []

    @property
    def latest(self) -> list[PartitionLag]:
        """The last sample (empty before the first)."""
        return self._latest

    def sample(self) -> list[PartitionLag]:
        """Sample once, export the result and return it."""
        if self._admin is None:
            self._admin = admin_client(self.settings)
        rows = describe(self.settings, self.groups, self.topics, self._admin)
        self._export(rows)
        self._latest = rows
        return rows

    def _export(self, rows: list[PartitionLag]) -> None:
        m = self.metrics
        seen = set()
        for r in rows:
            labels = (r.group, r.topic, str(r.partition))
            seen.add(labels)
            m.consumer_lag.labels(*labels).set(r.lag)
            m.consumer_committed_offset.labels(*labels).set(r.position)
            if r.time_lag_s is not None:
                m.consumer_time_lag.labels(*labels).set(r.time_lag_s)
        for labels in self._exported - seen:
            for gauge in (m.consumer_lag, m.consumer_time_lag, m.consumer_committed_offset):
                with contextlib.suppress(KeyError):  # never had a time lag
                    gauge.remove(*labels)
        self._exported = seen

    def start(self) -> LagMonitor:
        self._thread = threading.Thread(target=self._run, name="sluice-lag", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as exc:  # noqa: BLE001 - a failed sample must not end sampling
                log.warning("lag sample failed: %s", exc)
            self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        """Stop sampling; a sample still waiting on the cluster is left to its daemon thread."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
