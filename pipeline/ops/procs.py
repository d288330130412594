"""Worker child processes, started and stopped by PID (for the bench, the demo and tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

from pipeline.config import Settings


def spawn(
    settings: Settings,
    args: list[str],
    log_path: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start ``sluice <args>`` in a child process with ``settings`` (and ``extra_env``) in its
    environment."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1", **(extra_env or {})}
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]


def spawn_workers(
    settings: Settings,
    mode: str,
    log_dir: Path | None = None,
    count: int = 1,
    gpus: list[str] | None = None,
    per_gpu: int = 1,
) -> list[subprocess.Popen[bytes]]:
    """The processes of one pipeline: ``count`` for fused/naive (one consumer group), one
    per stage for split, each stage ``count`` times; with ``gpus``, ``per_gpu`` fused
    workers per GPU, each seeing only its own (``CUDA_VISIBLE_DEVICES``), all in one group.

    With a ``metrics_port``, the processes serve metrics on that port and the ones after it
    (in the order started), since they share a host.
    """
    if gpus is not None:
        if mode != "fused":
            raise ValueError(f"one worker per GPU runs the fused mode, not {mode!r}")
        if log_dir:
            log_dir.mkdir(parents=True, exist_ok=True)
        names = [(gpu, f"gpu{gpu}" + (f"-{k}" if per_gpu > 1 else ""))
                 for gpu in gpus for k in range(per_gpu)]  # fmt: skip
        return [
            spawn(
                _metrics_port_after(settings, i).replace(worker_id=name),
                ["worker", "--mode", "fused"],
                log_dir / f"worker-{name}.log" if log_dir else None,
                {"CUDA_VISIBLE_DEVICES": gpu},
            )
            for i, (gpu, name) in enumerate(names)
        ]
    if count > 1:
        per_copy = 3 if mode == "split" else 1
        return [p for i in range(count) for p in spawn_workers(
            _metrics_port_after(settings, i * per_copy).replace(worker_id=str(i)), mode,
            log_dir / f"w{i}" if log_dir else None)]  # fmt: skip
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    if mode == "split":
        stages = ["gateway", "infer", "respond"]
        return [
            spawn(
                _metrics_port_after(settings, i),
                ["worker", "--mode", "split", "--stage", s],
                log_dir / f"worker-{s}.log" if log_dir else None,
            )
            for i, s in enumerate(stages)
        ]
    if mode in ("relay", "guarded-relay"):
        args = ["relay", "--guarded"] if mode == "guarded-relay" else ["relay"]
        return [spawn(settings, args, log_dir / f"{mode}.log" if log_dir else None)]
    return [
        spawn(
            settings,
            ["worker", "--mode", mode],
            log_dir / f"worker-{mode}.log" if log_dir else None,
        )
    ]


def _metrics_port_after(settings: Settings, offset: int) -> Settings:
    if not settings.metrics_port or not offset:
        return settings
    return settings.replace(metrics_port=settings.metrics_port + offset)


def stop(procs: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    """SIGTERM each process we started, then SIGKILL whatever outlives ``timeout_s``."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
            p.wait(timeout=10)


def kill(procs: list[subprocess.Popen[bytes]]) -> None:
    """SIGKILL (a crash, for fault tests)."""
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                p.kill()
        p.wait(timeout=10)


def parse_gpus(spec: str, available: int) -> list[str]:
    """``all`` (every GPU the host has) or a comma list of GPU indices, as strings."""
    if spec == "all":
        if available < 1:
            raise ValueError("--gpus all: this host has no NVIDIA GPU")
        return [str(i) for i in range(available)]
    ids = [s.strip() for s in spec.split(",") if s.strip()]
    if not ids or not all(i.isdigit() for i in ids):
        raise ValueError(f"--gpus takes 'all' or GPU indices like 0,1, got {spec!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--gpus names a GPU twice: {spec!r}")
    missing = [i for i in ids if int(i) >= available]
    if missing:
        raise ValueError(
            f"--gpus {spec}: this host has {available} GPU(s), no {', '.join(missing)}"
        )
    return ids


def gpu_count() -> int:
    """The host's NVIDIA GPUs, from NVML (0 without a driver): CUDA stays uninitialised in a
    process that only starts workers."""
    from pipeline.observability.gpu import load_nvml

    nvml = load_nvml()
    if nvml is None:
        return 0
    try:
        return int(nvml.nvmlDeviceGetCount())
    except Exception:  # noqa: BLE001 - no driver, no GPUs
        return 0
