"""The lag monitor's logic without a broker: time lag, export to gauges, the table."""

from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from pipeline.config import Settings
from pipeline.kafka import lag
from pipeline.kafka.lag import PartitionLag
from pipeline.observability import lag_monitor
from pipeline.observability.lag_monitor import LagMonitor
from pipeline.observability.metrics import Metrics


def row(
    partition: int = 0,
    committed: int | None = 5,
    start: int = 0,
    end: int = 8,
    time_lag_s: float | None = 0.0,
) -> PartitionLag:
    lag_ = max(0, end - (start if committed is None else max(committed, start)))
    return PartitionLag("g", "t", partition, committed, start, end, lag_, time_lag_s)


def test_position_is_the_committed_offset_or_the_log_start() -> None:
    assert row(committed=5).position == 5
    assert row(committed=None, start=3).position == 3
    # Retention deleted records the group never read: it resumes at the log start.
    assert row(committed=2, start=4).position == 4


def test_time_lag_is_the_age_of_the_record_at_the_position(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[set[tuple[str, int, int]]] = []

    def read(
        settings: Settings, positions: set[tuple[str, int, int]], timeout_s: float
    ) -> dict[tuple[str, int, int], float]:
        asked.append(positions)
        return {("t", 0, 5): 990.0}

    monkeypatch.setattr(lag, "read_timestamps", read)
    rows = [row(0, committed=5), row(1, committed=8), row(2, committed=None, start=2)]
    out = lag._with_time_lag(Settings(), rows, now_s=1000.0)
    # Only partitions with lag are read; no lag means no age.
    assert asked == [{("t", 0, 5), ("t", 2, 2)}]
    assert [r.time_lag_s for r in out] == [10.0, 0.0, None]
    assert [r.lag for r in out] == [3, 0, 6]


def test_no_read_when_nothing_lags(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lag, "read_timestamps", lambda *a: pytest.fail("read without lag"))
    out = lag._with_time_lag(Settings(), [row(committed=8)], now_s=0.0)
    assert out[0].time_lag_s == 0.0


def test_clock_skew_never_gives_a_negative_age(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lag, "read_timestamps", lambda *a: {("t", 0, 5): 2000.0})
    assert lag._with_time_lag(Settings(), [row()], now_s=1000.0)[0].time_lag_s == 0.0


def test_monitor_exports_gauges_and_drops_partitions_that_disappear(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    registry = CollectorRegistry()
    monitor = LagMonitor(Settings(), Metrics(registry), ["g"], ["t"], interval_s=1.0)
    samples = [
        [row(0, time_lag_s=2.5), row(1, committed=None, start=1, time_lag_s=None)],
        [row(0, committed=8, time_lag_s=0.0)],
    ]
    monkeypatch.setattr(lag_monitor, "admin_client", lambda settings: object())
    monkeypatch.setattr(lag_monitor, "describe", lambda *a, **k: samples.pop(0))

    def value(name: str, partition: int) -> float | None:
        labels = {"group": "g", "topic": "t", "partition": str(partition)}
        return registry.get_sample_value(name, labels)

    first = monitor.sample()
    assert monitor.latest == first
    assert value("sluice_consumer_lag", 0) == 3
    assert value("sluice_consumer_time_lag_seconds", 0) == 2.5
    assert value("sluice_consumer_committed_offset", 0) == 5
    assert value("sluice_consumer_lag", 1) == 7
    assert value("sluice_consumer_committed_offset", 1) == 1  # the log start: nothing committed
    assert value("sluice_consumer_time_lag_seconds", 1) is None  # age unknown: no value

    monitor.sample()
    assert value("sluice_consumer_lag", 0) == 0
    assert value("sluice_consumer_time_lag_seconds", 0) == 0.0
    for name in ("sluice_consumer_lag", "sluice_consumer_committed_offset"):
        assert value(name, 1) is None


def test_monitor_thread_keeps_sampling_after_errors_and_stops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = []

    def failing(*_a: object, **_k: object) -> list[PartitionLag]:
        calls.append(1)
        raise RuntimeError("broker away")

    monkeypatch.setattr(lag_monitor, "admin_client", lambda settings: object())
    monkeypatch.setattr(lag_monitor, "describe", failing)
    monitor = LagMonitor(Settings(), Metrics(), ["g"], ["t"], interval_s=0.01).start()
    try:
        deadline = time.monotonic() + 5
        while len(calls) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        monitor.stop()
    assert len(calls) >= 3
    assert monitor._thread is None


def test_format_table() -> None:
    rows = [
        PartitionLag("sluice-fused", "sluice.requests", 0, 120, 0, 150, 30, 1.25),
        PartitionLag("sluice-fused", "sluice.requests", 11, None, 0, 7, 7, None),
    ]
    lines = lag.format_table(rows).splitlines()
    assert lines[0].split() == list(lag.COLUMNS)
    assert lines[1].split() == ["sluice-fused", "sluice.requests", "0", "120", "150", "30", "1.2"]
    assert lines[2].split() == ["sluice-fused", "sluice.requests", "11", "-", "7", "7", "-"]
    # Numbers are right-aligned under their headers.
    assert len({len(line) for line in lines}) == 1
    assert lag.format_table([]).split() == list(lag.COLUMNS)
