"""The rollback guard: compares a canary with its baseline over a sliding window of finished
requests, and decides when the canary must lose its traffic.

It only decides; `Experiments.rollback` applies the decision and the caller records the event.
Time is passed in (``now``), so the decision is a function of what was recorded.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from dataclasses import dataclass

from pipeline.experiments.config import MAX_WINDOW_REQUESTS, Experiment

# Before a model's first check tells its window, entries are kept this long (the largest
# window a guard may have).
_MAX_WINDOW_S = 3600.0


@dataclass(frozen=True)
class Rollback:
    """A decision to roll ``variant`` (the canary) of ``model`` back, with the figures it was
    taken on; latencies in milliseconds, error rates as fractions."""

    model: str
    variant: str
    baseline: str
    fingerprint: str
    reason: str
    canary_error_rate: float
    baseline_error_rate: float
    canary_p99_ms: float
    baseline_p99_ms: float
    canary_requests: int
    baseline_requests: int
    window_s: float
    at: float

    def to_json(self) -> dict[str, object]:
        """The decision as a JSON object, for the event record."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class _Figures:
    requests: int
    error_rate: float
    p99_ms: float
    p50_ms: float


class RollbackGuard:
    """Finished requests per (model, variant) over a sliding window, and the check of a
    canary against its baseline.

    Memory is bounded: at most ``max_entries`` requests per (model, variant) are kept (the most
    recent), and entries older than the model's window are dropped on `record` and `check`.
    """

    def __init__(self, max_entries: int = MAX_WINDOW_REQUESTS) -> None:
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be an integer >= 1, got {max_entries!r}")
        self._max_entries = max_entries
        # (finished at, latency in seconds, ok), oldest first.
        self._windows: dict[tuple[str, str], deque[tuple[float, float, bool]]] = {}
        self._window_s: dict[str, float] = {}
        # The version each window's entries were served by, as of the last check.
        self._versions: dict[tuple[str, str], str] = {}

    def record(self, model: str, variant: str, latency_s: float, ok: bool, now: float) -> None:
        """Count a finished request: ``ok`` False for an error or an expired request."""
        entries = self._windows.get((model, variant))
        if entries is None:
            entries = self._windows[(model, variant)] = deque(maxlen=self._max_entries)
        entries.append((now, latency_s, ok))
        self._prune(entries, now - self._window_s.get(model, _MAX_WINDOW_S))

    def check(self, experiment: Experiment, now: float) -> Rollback | None:
        """Whether ``experiment``'s canary must be rolled back at ``now``.

        A decision needs a guard, a canary with weight > 0, at least ``min_requests`` finished
        requests of both canary and baseline over the last ``window_s``, and a threshold
        crossed. The canary's entries are cleared by a decision, so that one decision is taken
        on the same evidence; a variant's entries are cleared too when it is found served by
        another version than at the last check.
        """
        guard = experiment.guard
        if guard is None:
            return None
        model = experiment.model
        self._window_s[model] = guard.window_s
        variants = {v.name: v for v in experiment.variants}
        canary, baseline = variants.get(guard.canary), variants.get(guard.baseline)
        if canary is None or baseline is None:
            return None
        for variant in (canary, baseline):
            if self._versions.setdefault((model, variant.name), variant.version) != variant.version:
                self._versions[(model, variant.name)] = variant.version
                self._windows.pop((model, variant.name), None)
        if canary.weight <= 0:
            return None
        ours = self._figures(model, canary.name, now - guard.window_s)
        theirs = self._figures(model, baseline.name, now - guard.window_s)
        if ours is None or theirs is None:
            return None
        if min(ours.requests, theirs.requests) < guard.min_requests:
            return None
        crossed = []
        if ours.error_rate - theirs.error_rate > guard.max_error_rate_delta:
            crossed.append(
                f"error rate {ours.error_rate:.1%} > baseline {theirs.error_rate:.1%}"
                f" + {guard.max_error_rate_delta * 100:g} points"
            )
        if ours.p99_ms > theirs.p99_ms * guard.max_p99_ratio + guard.max_p99_delta_ms:
            crossed.append(
                f"p99 {ours.p99_ms:.1f} ms > {guard.max_p99_ratio:g} x baseline"
                f" {theirs.p99_ms:.1f} ms + {guard.max_p99_delta_ms:g} ms"
            )
        if guard.max_p50_ratio and (
            ours.p50_ms > theirs.p50_ms * guard.max_p50_ratio + guard.max_p50_delta_ms
        ):
            crossed.append(
                f"p50 {ours.p50_ms:.1f} ms > {guard.max_p50_ratio:g} x baseline"
                f" {theirs.p50_ms:.1f} ms + {guard.max_p50_delta_ms:g} ms"
            )
        if not crossed:
            return None
        self._windows.pop((model, canary.name), None)
        reason = (
            f"{' and '.join(crossed)} over the last {guard.window_s:g} s"
            f" (canary {ours.requests:,} requests, baseline {theirs.requests:,})"
        )
        return Rollback(
            model=model,
            variant=canary.name,
            baseline=baseline.name,
            fingerprint=experiment.fingerprint,
            reason=reason,
            canary_error_rate=ours.error_rate,
            baseline_error_rate=theirs.error_rate,
            canary_p99_ms=ours.p99_ms,
            baseline_p99_ms=theirs.p99_ms,
            canary_requests=ours.requests,
            baseline_requests=theirs.requests,
            window_s=guard.window_s,
            at=now,
        )

    def _figures(self, model: str, variant: str, since: float) -> _Figures | None:
        entries = self._windows.get((model, variant))
        if entries is None:
            return None
        self._prune(entries, since)
        if not entries:
            return None
        latencies = sorted(latency for _, latency, _ in entries)
        errors = sum(1 for _, _, ok in entries if not ok)
        # Exact nearest-rank p99: the smallest latency at least 99 % of the requests are within.
        p99_s = latencies[math.ceil(0.99 * len(latencies)) - 1]
        p50_s = latencies[math.ceil(0.5 * len(latencies)) - 1]
        return _Figures(len(entries), errors / len(entries), p99_s * 1000.0, p50_s * 1000.0)

    @staticmethod
    def _prune(entries: deque[tuple[float, float, bool]], since: float) -> None:
        while entries and entries[0][0] < since:
            entries.popleft()
