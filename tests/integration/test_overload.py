"""Ten times the worker's capacity, for a bounded time: memory stays bounded, lag rises and
then drains, and every request ends as ``ok`` or ``expired`` (none lost).

The scenario is `benchmarks.chaos.overload` (heavy requests, served one per batch, each with a
TTL). The issue asks for 60 s of overload; CI runs 20 s. The long one is
``sluice chaos --scenario overload`` (or ``SLUICE_OVERLOAD_S=60`` here).
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks import chaos
from tests.integration.conftest import make_settings

OVERLOAD_S = float(os.environ.get("SLUICE_OVERLOAD_S", "20"))
FACTOR = 10.0


def test_overload_ten_times_capacity(bootstrap: str, tmp_path: Path) -> None:
    settings = make_settings(bootstrap, None)
    result = chaos.overload(settings, tmp_path, duration_s=OVERLOAD_S, factor=FACTOR)
    print(result)
    capacity = result["capacity_rps"]
    assert result["capacity_probe_ok"]
    assert result["undelivered"] == 0
    assert result["planned_rps"] >= 5 * capacity
    # What the scenario needs is overload, not the generator's pace on this machine: at
    # 3x capacity the lag must rise (asserted below) whatever else runs beside it.
    assert result["offered_rps"] >= 3 * capacity, "could not offer the load"
    assert result["lost"] == 0, f"{result['lost']} requests never answered"
    assert result["duplicates_seen"] == 0
    assert set(result["outcomes"]) == {"ok", "expired"}, result["outcomes"]
    assert result["wrong_outputs"] == 0
    assert result["max_lag"] >= 2 * capacity, "lag never rose: the worker was not overloaded"
    assert result["final_lag"] == 0, f"lag did not drain: {result['final_lag']}"
    assert result["crashes_unexpected"] == 0, "the worker exited"
    assert result["max_rss_mb"] < chaos.OVERLOAD_RSS_BOUND_MB
    assert result["rss_growth_mb"] < chaos.OVERLOAD_RSS_GROWTH_BOUND_MB
    assert result["within_rss_bound"]
