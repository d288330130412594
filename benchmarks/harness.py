"""Drive a pipeline from outside, as users' traffic and faults do: worker processes started
and killed by PID, demo requests sent at a pace, whole topics read back record by record,
and worker memory read from ``/proc``. Used by `benchmarks.chaos` and the integration tests.
"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.client import Client
from pipeline.config import Settings
from pipeline.kafka import consume_batch, topic_reader
from pipeline.ops import procs


def demo_request(request_id: str, features: Any = None, **extra: object) -> dict[str, Any]:
    """A request for the demo model (16 FP32 features)."""
    features = features if features is not None else [0.1 * i for i in range(16)]
    return {
        "id": request_id,
        "model": "demo",
        "inputs": [{"name": "features", "datatype": "FP32", "shape": [16], "data": features}],
        **extra,
    }


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MiB, from ``/proc/<pid>/status``."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise ProcessLookupError(f"no VmRSS for pid {pid}")


class Workers:
    """The worker processes of one pipeline (``count`` sharing one consumer group)."""

    def __init__(self, settings: Settings, mode: str, log_dir: Path, count: int = 1) -> None:
        self.settings = settings
        self.mode = mode
        self.log_dir = log_dir
        self.count = count
        self.procs: list[subprocess.Popen[bytes]] = []
        self.restarts = 0

    def start(self) -> Workers:
        self.procs = procs.spawn_workers(self.settings, self.mode, self.log_dir, self.count)
        return self

    def stop(self) -> None:
        procs.stop(self.procs)

    def restart_stuck(self) -> int:
        """Start again each process that ended itself as stuck (status 75: its loop stalled,
        `pipeline.engines.worker.exit_if_stalled`), as a Deployment restarts a pod whose
        liveness probe fails; returns how many were started (`restarts` counts them all)."""
        from pipeline.engines.worker import EXIT_STUCK

        started = 0
        for i, p in enumerate(self.procs):
            if p.poll() == EXIT_STUCK:
                self.restarts += 1
                log_dir = self.log_dir / f"restart-{self.restarts}"
                self.procs[i] = procs.spawn_workers(self.settings, self.mode, log_dir)[0]
                started += 1
        return started

    def kill(self) -> None:
        """SIGKILL every process: a crash."""
        procs.kill(self.procs)

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.log_dir.rglob("*.log"))
        )

    def wait_ready(self, client: Client, timeout_s: float = 90.0) -> int:
        """Send probe requests until one is answered; returns how many were sent (each is
        answered in the end: the unanswered ones wait in Kafka for the worker)."""
        deadline = time.monotonic() + timeout_s
        i = 0
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"worker exited:\n{self.logs()}")
            future = client.submit(demo_request(f"probe-{uuid.uuid4().hex[:6]}-{i}"))
            client.flush()
            try:
                future.result(timeout=3)
                return i + 1
            except Exception:  # noqa: BLE001 - not ready yet
                i += 1
        raise RuntimeError(f"pipeline not ready after {timeout_s}s:\n{self.logs()}")


class PacedSender(threading.Thread):
    """Submits demo requests ``<prefix>0`` .. ``<prefix><n-1>`` at ``rate`` per second.

    ``futures`` fills as the requests go out, so a caller can act (stop a worker, the
    broker) in the middle of the run and count how far it got.
    """

    def __init__(
        self,
        client: Client,
        n: int,
        rate: float,
        on_future: Callable[[Future], None] | None = None,  # type: ignore[type-arg]
        flush: bool = True,
        prefix: str = "r-",
    ) -> None:
        super().__init__(daemon=True)
        self.client, self.n, self.rate = client, n, rate
        self.on_future, self.flush, self.prefix = on_future, flush, prefix
        self.futures: list[Future] = []  # type: ignore[type-arg]

    def run(self) -> None:
        start = time.monotonic()
        for i in range(self.n):
            delay = start + i / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            future = self.client.submit(demo_request(f"{self.prefix}{i}"))
            if self.on_future is not None:
                self.on_future(future)
            self.futures.append(future)
        if self.flush:
            self.client.flush()


@dataclass(frozen=True, slots=True)
class Read:
    """One record as it sits on the broker."""

    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


class TopicReader:
    """Every partition of a topic from its first offset, outside any consumer group.

    Unlike `pipeline.client.Client` it sees every record, duplicates included, and never
    blocks on a bounded pending map. With ``keep=False`` it only counts them (``count``)
    and hands each to the callback, for topics too large to hold.
    """

    def __init__(
        self,
        settings: Settings,
        topic: str,
        isolation_level: str = "read_uncommitted",
        keep: bool = True,
    ) -> None:
        self.topic = topic
        self.keep = keep
        self.records: list[Read] = []
        self.count = 0
        group = f"{settings.topic_prefix}-reader-{uuid.uuid4().hex[:8]}"
        self._consumer = topic_reader(settings, topic, group, isolation_level)

    def _poll(self, timeout_s: float, on_record: Callable[[Read], None] | None) -> int:
        got = 0
        for m in consume_batch(self._consumer, 1000, timeout_s):
            if m.error() is not None:
                continue
            read = Read(m.partition(), m.offset(), m.key(), m.value())
            if self.keep:
                self.records.append(read)
            if on_record is not None:
                on_record(read)
            got += 1
        self.count += got
        return got

    def read_until(
        self,
        done: Callable[[], bool],
        timeout_s: float,
        on_record: Callable[[Read], None] | None = None,
        idle_s: float = 1.5,
    ) -> bool:
        """Read until ``done()`` holds, then on until nothing new came for ``idle_s``.

        The idle tail catches records that arrive after the expected ones (duplicates, or
        extras that should not be there). Returns whether ``done()`` held in time.
        """
        deadline = time.monotonic() + timeout_s
        while not done() and time.monotonic() < deadline:
            self._poll(0.2, on_record)
        ok = done()
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < idle_s and time.monotonic() < deadline + idle_s:
            if self._poll(0.2, on_record):
                quiet_since = time.monotonic()
        return ok

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
