"""``sluice chaos``: the fault scenarios that prove delivery and flow control, one function
each, every one returning a JSON-ready dict with at least ``sent``, ``answered``, ``lost``,
``duplicates_seen``, ``dlq``, ``crashes`` (deliberate kills), ``crashes_unexpected`` (worker
processes that died on their own) and ``max_rss_mb``, plus the scenario's own figures.

The integration tests call these functions with small sizes and assert on the dict; the
long versions (a 100k-request kill loop, a 20-minute soak) run from the command line.
"""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.chaos.cluster import leader_kill, rolling_restart
from benchmarks.chaos.common import RssSampler, duplicates, slope_per_min
from benchmarks.chaos.delivery import broker_restart, crash, rolling_update, scale_out
from benchmarks.chaos.inputs import garbage, poison
from benchmarks.chaos.load import (
    OVERLOAD_RSS_BOUND_MB,
    OVERLOAD_RSS_GROWTH_BOUND_MB,
    overload,
    soak,
)
from pipeline.config import Settings
from pipeline.ops.broker import LocalBroker

__all__ = [
    "OVERLOAD_RSS_BOUND_MB",
    "OVERLOAD_RSS_GROWTH_BOUND_MB",
    "SCENARIOS",
    "RssSampler",
    "broker_restart",
    "crash",
    "duplicates",
    "garbage",
    "leader_kill",
    "overload",
    "poison",
    "rolling_restart",
    "rolling_update",
    "run",
    "scale_out",
    "slope_per_min",
    "soak",
]

# -- the command ----------------------------------------------------------------------------

SCENARIOS: dict[str, Callable[..., dict[str, Any]]] = {
    "overload": overload,
    "crash": crash,
    "broker-restart": broker_restart,
    "leader-kill": leader_kill,
    "rolling-restart": rolling_restart,
    "rolling-update": rolling_update,
    "garbage": garbage,
    "poison": poison,
    "scale-out": scale_out,
    "soak": soak,
}


OWN_BROKERS = ("broker-restart", "leader-kill", "rolling-restart")


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run(
    settings: Settings,
    scenario: str,
    requests: int | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """Run one scenario (its defaults where ``requests`` / ``duration_s`` are None).

    With no ``settings.bootstrap``, a broker of the run's own is started (and stopped) in a
    temporary directory. The directory, worker logs included, is kept (``work_dir``) when
    the run lost requests or a worker crashed unexpectedly.
    """
    if scenario not in SCENARIOS:
        raise ValueError(f"scenario must be one of {sorted(SCENARIOS)}, got {scenario!r}")
    if requests is not None and requests < 1:
        raise ValueError(f"requests must be an integer >= 1, got {requests}")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be > 0 seconds, got {duration_s}")
    work = Path(tempfile.mkdtemp(prefix=f"sluice-chaos-{scenario}-"))
    broker = None
    result: dict[str, Any] = {}
    previous = None
    if threading.current_thread() is threading.main_thread():
        # SIGTERM unwinds like Ctrl-C, so that the workers and the broker are stopped.
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        # These start (and restart) brokers of their own.
        if not settings.bootstrap and scenario not in OWN_BROKERS:
            broker = LocalBroker(work / "kafka", settings.cache_dir)
            settings = settings.replace(bootstrap=broker.start().bootstrap)
        started = time.monotonic()
        result = SCENARIOS[scenario](settings, work, requests=requests, duration_s=duration_s)
        result = {"scenario": scenario, **result, "elapsed_s": round(time.monotonic() - started)}
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if broker is not None:
            broker.stop()
        if result and not result["lost"] and not result["crashes_unexpected"]:
            shutil.rmtree(work, ignore_errors=True)
        else:
            result["work_dir"] = str(work)
    return result
