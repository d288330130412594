"""Worker processes on one host get metrics ports of their own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.ops import procs


@pytest.fixture
def spawned(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, list[str]]]:
    calls: list[tuple[int, list[str]]] = []

    def spawn(settings: Settings, args: list[str], log_path: Path | None = None) -> Any:
        calls.append((settings.metrics_port, args))
        return object()

    monkeypatch.setattr(procs, "spawn", spawn)
    return calls


@pytest.mark.parametrize(
    ("mode", "count", "ports"),
    [
        ("fused", 1, [9400]),
        ("fused", 3, [9400, 9401, 9402]),
        ("split", 1, [9400, 9401, 9402]),
        ("split", 2, [9400, 9401, 9402, 9403, 9404, 9405]),
    ],
)
def test_metrics_ports_do_not_collide(
    spawned: list[tuple[int, list[str]]], mode: str, count: int, ports: list[int]
) -> None:
    procs.spawn_workers(Settings(metrics_port=9400), mode, count=count)
    assert [port for port, _ in spawned] == ports


def test_metrics_off_stays_off(spawned: list[tuple[int, list[str]]]) -> None:
    procs.spawn_workers(Settings(), "split", count=2)
    assert {port for port, _ in spawned} == {0}
