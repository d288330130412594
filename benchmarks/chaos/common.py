"""What every chaos scenario shares: fresh topics, worker RSS, answers counted per
request id, and the summary fields every scenario reports."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
import warnings
from collections import Counter, deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import PacedSender, TopicReader, Workers, rss_mb
from pipeline.client import Client
from pipeline.config import Settings
from pipeline.kafka import ensure_topics, pipeline_topics
from pipeline.models import ModelRegistry, init_demo
from pipeline.protocol import codec

# -- pure helpers ---------------------------------------------------------------------------


def duplicates(seen: Counter[str]) -> int:
    """Records beyond the first per key: ``seen`` counts how often each key was read."""
    return sum(seen.values()) - len(seen)


def slope_per_min(samples: list[tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` samples, in value per minute.

    Raises:
        ValueError: fewer than two samples, or all at one time.
    """
    if len(samples) < 2:
        raise ValueError(f"a slope needs at least 2 samples, got {len(samples)}")
    t = np.array([s[0] for s in samples], dtype=np.float64)
    v = np.array([s[1] for s in samples], dtype=np.float64)
    spread = float(((t - t.mean()) ** 2).sum())
    if spread == 0.0:
        raise ValueError("a slope needs samples at two different times at least")
    return float(((t - t.mean()) * (v - v.mean())).sum() / spread * 60.0)


# -- measuring ------------------------------------------------------------------------------


class RssSampler:
    """Samples the RSS of the live worker processes on a thread, every ``interval_s``.

    ``pids`` is called at each sample, so workers may be replaced during a run.
    ``samples`` holds ``(seconds since start, MiB summed over the processes)``; ``max_mb``
    is the largest single process seen.
    """

    def __init__(
        self, pids: Callable[[], list[int]], interval_s: float = 1.0, max_samples: int = 100_000
    ) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.samples: deque[tuple[float, float]] = deque(maxlen=max_samples)
        self.max_mb = 0.0
        self._start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> float:
        total = 0.0
        for pid in self.pids():
            try:
                mb = rss_mb(pid)
            except (OSError, ProcessLookupError):
                continue  # killed or exited between listing and reading
            total += mb
            self.max_mb = max(self.max_mb, mb)
        self.samples.append((time.monotonic() - self._start, total))
        return total

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> RssSampler:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def answers(futures: list[Future], timeout_s: float) -> list[codec.Response | None]:  # type: ignore[type-arg]
    """Each future's response, or None where none came within ``timeout_s`` overall."""
    deadline = time.monotonic() + timeout_s
    out: list[codec.Response | None] = []
    for f in futures:
        try:
            out.append(f.result(timeout=max(0.0, deadline - time.monotonic())))
        except Exception:  # noqa: BLE001 - timed out or cancelled: not answered
            out.append(None)
    return out


def responses_by_key(
    settings: Settings,
    prefix: bytes,
    expected: int,
    isolation_level: str = "read_committed",
    timeout_s: float = 240.0,
    idle_s: float = 3.0,
) -> Counter[str]:
    """How many responses each request key starting with ``prefix`` has on the topic."""
    seen: Counter[str] = Counter()

    def on_record(read: Any) -> None:
        if read.key is not None and read.key.startswith(prefix):
            seen[read.key.decode()] += 1

    with TopicReader(settings, settings.responses_topic, isolation_level, keep=False) as reader:
        reader.read_until(lambda: len(seen) >= expected, timeout_s, on_record, idle_s=idle_s)
    return seen


def topic_count(settings: Settings, topic: str, idle_s: float = 1.0) -> int:
    """Records now on ``topic`` (read until nothing new comes for ``idle_s``)."""
    with TopicReader(settings, topic, keep=False) as reader:
        reader.read_until(lambda: True, 60, idle_s=idle_s)
        return reader.count


def prepare(settings: Settings, scenario: str, work: Path, **changes: Any) -> Settings:
    """Fresh topics for one run, and the demo model (built in ``work`` unless a model
    directory is configured)."""
    prefix = f"{settings.topic_prefix}-{scenario}-{uuid.uuid4().hex[:8]}"
    settings = settings.replace(topic_prefix=prefix, **changes)
    if settings.model_dir is None:
        settings = settings.replace(model_dir=work / "models")
        init_demo(settings.models_path)
    ensure_topics(settings, pipeline_topics(settings, ModelRegistry(settings.models_path).names))
    return settings


# How long a scenario's worker may stall before it ends itself and is started again.
STALL_S = 30.0


@contextlib.contextmanager
def _restarting(workers: Workers) -> Iterator[None]:
    """While the block runs, a worker that exits as stuck (status 75, ``exit_on_stall``) is
    started again, as its Deployment would after a failed liveness probe."""
    stop = threading.Event()

    def supervise() -> None:
        while not stop.wait(0.5):
            workers.restart_stuck()

    thread = threading.Thread(target=supervise, name="chaos-supervisor", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)


@contextlib.contextmanager
def running(workers: Workers) -> Iterator[Workers]:
    try:
        yield workers
    finally:
        workers.stop()


def summary(
    sent: int,
    answered: int,
    lost: int,
    duplicates_seen: int,
    dlq: int,
    crashes: int,
    crashes_unexpected: int,
    max_rss: float,
) -> dict[str, Any]:
    return {
        "sent": sent,
        "answered": answered,
        "lost": lost,
        "duplicates_seen": duplicates_seen,
        "dlq": dlq,
        "crashes": crashes,
        "crashes_unexpected": crashes_unexpected,
        "max_rss_mb": round(max_rss, 1),
    }


@contextlib.contextmanager
def no_jit_deprecation() -> Iterator[None]:
    # torch 2.10+ deprecates torch.jit with a FutureWarning; the torchscript format still works.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"`torch\.jit\.\w+` is deprecated", FutureWarning)
        yield


class Violations:
    """Counts each kind of broken promise, keeping a few examples of each."""

    def __init__(self, names: list[str]) -> None:
        self.counts = dict.fromkeys(names, 0)
        self.examples: list[str] = []

    def check(self, name: str, ok: bool, example: object = "") -> None:
        if not ok:
            self.counts[name] += 1
            if len(self.examples) < 10:
                self.examples.append(f"{name}: {example!r}"[:500])


# An answer slower than this counts as delayed by the fault.
SLOW_S = 1.0


class Timeline:
    """When each request was sent and answered (monotonic seconds)."""

    def __init__(self) -> None:
        self.sent: list[float] = []
        self.answered: dict[int, float] = {}

    def track(self, future: Future) -> None:  # type: ignore[type-arg]
        i = len(self.sent)
        self.sent.append(time.monotonic())
        future.add_done_callback(lambda _: self.answered.__setitem__(i, time.monotonic()))

    def recovery_s(self, fault_at: float) -> float:
        """From ``fault_at`` until the last answer slower than `SLOW_S` arrived (0: none)."""
        delayed = [
            done for i, done in self.answered.items()
            if done >= fault_at and done - self.sent[i] > SLOW_S
        ]  # fmt: skip
        return round(max(delayed) - fault_at, 2) if delayed else 0.0


# A fault: run in the middle of a paced load, given its sender and the workers (whose
# processes it may replace); returns when each fault struck (monotonic seconds) and what
# it was.
Fault = Callable[[PacedSender, Workers], list[tuple[float, str]]]


def under_fault(
    settings: Settings, work: Path, n: int, rate: float, fault: Fault
) -> dict[str, Any]:
    """A fused worker serves ``n`` paced requests (at ``rate``) while ``fault`` runs: the
    summary (duplicates as a read_committed reader sees them), ``recovery_s`` (the longest,
    over the faults), the faults, whether the sender finished, answers under the wrong id,
    and the outcomes.

    A worker whose loop stalls ends itself (status 75) and is started again, as a liveness
    probe and its Deployment would (`pipeline.engines.worker.exit_if_stalled`): a client
    library can wait without end after a broker fault (librdkafka's transactional producer
    for a group coordinator that left the metadata, confluentinc/librdkafka#5511). Each
    result says how often (``restarts_stuck``)."""
    settings = settings.replace(
        exit_on_stall=True, stall_timeout_s=min(settings.stall_timeout_s, STALL_S)
    )
    workers = Workers(settings, "fused", work / "logs" / "w0")
    timeline = Timeline()
    with (
        Client(settings) as client,
        running(workers.start()),
        RssSampler(lambda: [p.pid for p in workers.procs]) as rss,
        _restarting(workers),
    ):
        workers.wait_ready(client)
        # Produced into librdkafka's queue while a broker is away, sent once it is back.
        sender = PacedSender(client, n, rate, on_future=timeline.track, flush=False)
        sender.start()
        try:
            faults = fault(sender, workers)
        finally:
            sender.join(timeout=120)
        sender_finished = not sender.is_alive()
        with contextlib.suppress(TimeoutError):
            client.flush(120)
        responses = answers(sender.futures, 180)
        alive = workers.alive()
    answered = sum(r is not None for r in responses)
    committed = responses_by_key(settings, b"r-", n, "read_committed", 60)
    return {
        **summary(
            len(sender.futures),
            answered,
            n - answered,
            duplicates(committed),
            topic_count(settings, settings.dlq_topic),
            0,
            int(not alive),
            rss.max_mb,
        ),  # fmt: skip
        "recovery_s": max((timeline.recovery_s(at) for at, _ in faults), default=0.0),
        "faults": [what for _, what in faults],
        "sender_finished": sender_finished,
        "ids_mismatched": sum(r is not None and r.id != f"r-{i}" for i, r in enumerate(responses)),
        "outcomes": dict(Counter(r.status for r in responses if r is not None)),
        "restarts_stuck": workers.restarts,
    }
