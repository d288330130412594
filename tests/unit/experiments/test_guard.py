"""The rollback guard: a decision only on enough evidence inside the window, on either
threshold, with the figures it was taken on."""

from __future__ import annotations

import json
from typing import Any

import pytest

from pipeline.experiments import Experiment, ExperimentError, Rollback, RollbackGuard, parse

VERSIONS = ["1", "2", "3"]


def experiment(canary_version: str = "2", **guard: Any) -> Experiment:
    settings = {
        "canary": "b",
        "baseline": "a",
        "window_s": 30,
        "min_requests": 100,
        "max_error_rate_delta": 0.02,
        "max_p99_ratio": 1.5,
        "max_p99_delta_ms": 5,
        **guard,
    }
    data = {
        "variants": [
            {"name": "a", "version": "1", "weight": 90},
            {"name": "b", "version": canary_version, "weight": 10},
        ],
        "guard": settings,
    }
    return parse("m", data, VERSIONS)


def feed(
    guard: RollbackGuard,
    variant: str,
    n: int,
    latency_ms: float = 10.0,
    errors: int = 0,
    at: float = 100.0,
) -> None:
    """``n`` finished requests of ``variant`` at time ``at``, the first ``errors`` failed."""
    for i in range(n):
        guard.record("m", variant, latency_ms / 1000, ok=i >= errors, now=at)


def test_no_decision_below_min_requests() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000)
    feed(guard, "b", 99, latency_ms=500, errors=99)
    assert guard.check(experiment(), now=100.0) is None
    feed(guard, "b", 1, latency_ms=500, errors=1)
    assert guard.check(experiment(), now=100.0) is not None


def test_no_decision_without_enough_baseline() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 99)
    feed(guard, "b", 1000, latency_ms=500, errors=1000)
    assert guard.check(experiment(), now=100.0) is None


def test_a_decision_on_the_error_rate() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000, errors=10)  # 1 %
    feed(guard, "b", 200, errors=20)  # 10 %
    decision = guard.check(experiment(), now=100.0)
    assert decision is not None
    assert (decision.model, decision.variant, decision.baseline) == ("m", "b", "a")
    assert decision.fingerprint == experiment().fingerprint
    assert decision.canary_error_rate == pytest.approx(0.10, rel=1e-9)
    assert decision.baseline_error_rate == pytest.approx(0.01, rel=1e-9)
    assert (decision.canary_requests, decision.baseline_requests) == (200, 1000)
    assert decision.window_s == pytest.approx(30.0, rel=1e-12)
    assert decision.at == pytest.approx(100.0, rel=1e-12)
    assert decision.reason == (
        "error rate 10.0% > baseline 1.0% + 2 points over the last 30 s "
        "(canary 200 requests, baseline 1,000)"
    )


def test_an_error_rate_within_the_margin_is_no_decision() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000, errors=10)  # 1 %
    feed(guard, "b", 200, errors=5)  # 2.5 %: 1.5 points over, the margin is 2
    assert guard.check(experiment(), now=100.0) is None


def test_a_decision_on_the_p99_latency() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 2300, latency_ms=12.0)
    feed(guard, "b", 250, latency_ms=41.2)
    decision = guard.check(experiment(), now=100.0)
    assert decision is not None
    assert decision.canary_p99_ms == pytest.approx(41.2, rel=1e-9)
    assert decision.baseline_p99_ms == pytest.approx(12.0, rel=1e-9)
    assert decision.canary_error_rate == pytest.approx(0.0, abs=1e-9)
    assert decision.reason == (
        "p99 41.2 ms > 1.5 x baseline 12.0 ms + 5 ms over the last 30 s "
        "(canary 250 requests, baseline 2,300)"
    )


@pytest.mark.parametrize(("canary_ms", "decided"), [(14.9, False), (15.1, True)])
def test_the_p99_ratio_alone(canary_ms: float, decided: bool) -> None:
    guard = RollbackGuard()
    feed(guard, "a", 200, latency_ms=10.0)
    feed(guard, "b", 200, latency_ms=canary_ms)
    decision = guard.check(experiment(max_p99_delta_ms=0), now=100.0)
    assert (decision is not None) is decided


def test_the_p99_is_exact_over_the_window() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 100, latency_ms=10.0)
    for ms in range(1, 101):  # 1..100 ms: the 99th of 100 in rank is 99 ms
        guard.record("m", "b", ms / 1000, ok=True, now=100.0)
    decision = guard.check(experiment(), now=100.0)
    assert decision is not None
    assert decision.canary_p99_ms == pytest.approx(99.0, rel=1e-9)


def test_both_thresholds_crossed_are_both_named() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 200, latency_ms=10.0)
    feed(guard, "b", 200, latency_ms=100.0, errors=100)
    decision = guard.check(experiment(), now=100.0)
    assert decision is not None
    assert decision.reason.startswith("error rate 50.0% > baseline 0.0% + 2 points and p99 100.0")


def test_entries_outside_the_window_are_ignored() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000, at=10.0)
    feed(guard, "b", 1000, latency_ms=500, errors=1000, at=10.0)
    # 30 s later they are still in (the window is [now - 30, now]); a moment after, gone.
    assert guard.check(experiment(), now=40.0) is not None
    guard = RollbackGuard()
    feed(guard, "a", 1000, at=10.0)
    feed(guard, "b", 1000, latency_ms=500, errors=1000, at=10.0)
    assert guard.check(experiment(), now=40.5) is None
    # Fresh, healthy traffic after the bad spell: still no decision.
    feed(guard, "a", 500, at=45.0)
    feed(guard, "b", 500, at=45.0)
    assert guard.check(experiment(), now=50.0) is None


def test_no_decision_once_the_canary_has_no_traffic() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000)
    feed(guard, "b", 1000, errors=1000)
    assert guard.check(experiment().with_weight("b", 0), now=100.0) is None


def test_no_decision_without_a_guard() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000)
    feed(guard, "b", 1000, errors=1000)
    plain = parse("m", {"variants": [{"name": "a", "version": "1", "weight": 90},
                                     {"name": "b", "version": "2", "weight": 10}]},
                  VERSIONS)  # fmt: skip
    assert guard.check(plain, now=100.0) is None


def test_one_decision_per_evidence() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000)
    feed(guard, "b", 1000, errors=1000)
    assert guard.check(experiment(), now=100.0) is not None
    assert guard.check(experiment(), now=100.5) is None


def test_a_new_canary_version_starts_from_no_evidence() -> None:
    guard = RollbackGuard()
    assert guard.check(experiment("2"), now=99.0) is None
    feed(guard, "a", 1000)
    feed(guard, "b", 1000, errors=1000)  # served by version 2
    assert guard.check(experiment("3"), now=100.0) is None


def test_memory_is_bounded_per_variant() -> None:
    guard = RollbackGuard(max_entries=150)
    feed(guard, "a", 1000)
    feed(guard, "b", 1000, errors=1000)
    decision = guard.check(experiment(), now=100.0)
    assert decision is not None
    assert (decision.canary_requests, decision.baseline_requests) == (150, 150)


def test_the_decision_is_a_json_event() -> None:
    guard = RollbackGuard()
    feed(guard, "a", 1000)
    feed(guard, "b", 1000, errors=1000)
    decision = guard.check(experiment(), now=100.0)
    assert isinstance(decision, Rollback)
    event = json.loads(json.dumps(decision.to_json()))
    assert set(event) == {
        "model", "variant", "baseline", "fingerprint", "reason", "canary_error_rate",
        "baseline_error_rate", "canary_p99_ms", "baseline_p99_ms", "canary_requests",
        "baseline_requests", "window_s", "at",
    }  # fmt: skip
    assert event["canary_error_rate"] == pytest.approx(1.0, rel=1e-12)
    assert event["variant"] == "b"


def test_the_median_shows_a_slow_canary_whose_tail_the_baseline_shares() -> None:
    """On one worker the canary's slow batches hold up the baseline too: equal tails, but
    the medians differ. Only a guard that compares medians (max_p50_ratio) sees it."""
    guard = RollbackGuard()
    for variant, typical in (("a", 3.0), ("b", 40.0)):
        for i in range(400):  # the slowest 5 % of each at 60 ms
            latency = 60.0 if i % 20 == 0 else typical
            guard.record("m", variant, latency / 1000, ok=True, now=100.0)
    assert guard.check(experiment(max_p99_ratio=1.5), now=100.0) is None
    decision = guard.check(experiment(max_p50_ratio=3, max_p50_delta_ms=10), now=100.0)
    assert decision is not None
    assert "p50 40.0 ms > 3 x baseline 3.0 ms + 10 ms" in decision.reason


@pytest.mark.parametrize("ratio", [0.5, -1, True, "2"])
def test_a_bad_median_ratio_is_refused(ratio: object) -> None:
    with pytest.raises(ExperimentError) as info:
        experiment(max_p50_ratio=ratio)
    assert str(info.value).startswith("guard.max_p50_ratio")
