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
    settings: Settings, args: list[str], log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    """Start ``sluice <args>`` in a child process with ``settings`` in its environment."""
    env = {**os.environ, **settings.to_env(), "PYTHONUNBUFFERED": "1"}
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
    settings: Settings, mode: str, log_dir: Path | None = None, count: int = 1
) -> list[subprocess.Popen[bytes]]:
    """The processes of one pipeline: ``count`` for fused/naive (one consumer group), one
    per stage for split, each stage ``count`` times.

    With a ``metrics_port``, the processes serve metrics on that port and the ones after it
    (in the order started), since they share a host.
    """
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
    if mode == "relay":
        return [spawn(settings, ["relay"], log_dir / "relay.log" if log_dir else None)]
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
