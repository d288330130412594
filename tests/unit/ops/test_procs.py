"""Worker processes on one host get metrics ports of their own."""

from __future__ import annotations

import re
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


GpuSpawns = list[tuple[Settings, list[str], dict[str, str] | None]]


@pytest.fixture
def gpu_spawns(monkeypatch: pytest.MonkeyPatch) -> GpuSpawns:
    calls: GpuSpawns = []

    def spawn(
        settings: Settings,
        args: list[str],
        log_path: Path | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> Any:
        calls.append((settings, args, extra_env))
        return object()

    monkeypatch.setattr(procs, "spawn", spawn)
    return calls


def test_one_fused_worker_per_gpu_each_seeing_only_its_own(gpu_spawns: GpuSpawns) -> None:
    procs.spawn_workers(Settings(metrics_port=9400), "fused", gpus=["0", "2"])
    assert [env for *_, env in gpu_spawns] == [
        {"CUDA_VISIBLE_DEVICES": "0"},
        {"CUDA_VISIBLE_DEVICES": "2"},
    ]
    assert [args for _, args, _ in gpu_spawns] == [["worker", "--mode", "fused"]] * 2
    # Distinct worker ids (transactional ids, feature stores) and metrics ports.
    ids = [(s.worker_id, s.metrics_port) for s, *_ in gpu_spawns]
    assert ids == [("gpu0", 9400), ("gpu2", 9401)]
    with pytest.raises(ValueError, match="fused"):
        procs.spawn_workers(Settings(), "split", gpus=["0"])


def test_two_workers_per_gpu_get_their_own_ids_and_ports(gpu_spawns: GpuSpawns) -> None:
    procs.spawn_workers(Settings(metrics_port=9400), "fused", gpus=["0", "3"], per_gpu=2)
    assert [(s.worker_id, s.metrics_port, env) for s, _, env in gpu_spawns] == [
        ("gpu0-0", 9400, {"CUDA_VISIBLE_DEVICES": "0"}),
        ("gpu0-1", 9401, {"CUDA_VISIBLE_DEVICES": "0"}),
        ("gpu3-0", 9402, {"CUDA_VISIBLE_DEVICES": "3"}),
        ("gpu3-1", 9403, {"CUDA_VISIBLE_DEVICES": "3"}),
    ]


def test_per_gpu_without_gpus_is_a_usage_error() -> None:
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, ["worker", "--per-gpu", "2"])
    assert result.exit_code == 2
    assert "--per-gpu goes with --gpus" in result.output


@pytest.mark.parametrize(
    ("spec", "available", "expected"),
    [("all", 4, ["0", "1", "2", "3"]), ("0,1", 2, ["0", "1"]), (" 3, 1 ", 4, ["3", "1"])],
)
def test_gpus_spec(spec: str, available: int, expected: list[str]) -> None:
    assert procs.parse_gpus(spec, available) == expected


@pytest.mark.parametrize(
    ("spec", "available", "error"),
    [
        ("all", 0, "no NVIDIA GPU"),
        ("0,x", 2, "GPU indices"),
        ("", 2, "GPU indices"),
        ("1,1", 2, "twice"),
        ("0,2", 2, "has 2 GPU(s)"),
    ],
)
def test_bad_gpus_specs_say_why(spec: str, available: int, error: str) -> None:
    with pytest.raises(ValueError, match=re.escape(error)):
        procs.parse_gpus(spec, available)
