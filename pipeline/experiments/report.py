"""The comparison report of a live experiment: each variant's latency, throughput and error
rates from the responses topic, shadow agreement from the shadow topic, and each variant's
difference from the baseline with a confidence interval and a verdict.

Latency is a response's ``timings.total_ms``, over every answered request that carries
timings, whatever its status (ok, error or expired): the latency a client waits for an answer.
Quantiles are ``np.quantile(..., method="linear")`` everywhere.

Confidence intervals are percentile bootstrap intervals. The variant's and the baseline's
observations are resampled independently, each with replacement to its own size, ``resamples``
(B) times; each resample gives the difference variant - baseline of the statistic (p50, p99,
error rate), and the interval is the (1 - c)/2 and (1 + c)/2 quantiles of those B differences.
For the error rate, drawing n 0/1 outcomes with replacement and counting the ones is a
Binomial(n, p) draw, so it is drawn as one. The generator is seeded, so a report is
reproducible.
"""

from __future__ import annotations

import json
import logging
import math
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import msgspec
import numpy as np
from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import consume_batch, high_watermark, topic_reader
from pipeline.protocol import codec

MIN_COUNT = 100
MAX_RECORDS = 5_000_000
# Indices per bootstrap chunk: the (rows, n) index matrix, the values it gathers and
# np.quantile's working copy stay near 100 MB whatever n is.
_CHUNK_INDICES = 4_000_000
_METHOD: Final = "linear"
_LEVELS = (0.5, 0.95, 0.99)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Observation:
    """One answered request of a variant; ``total_ms`` is NaN where it carries no timings,
    ``time_s`` is its record's Kafka timestamp."""

    variant: str
    status: str
    total_ms: float
    time_s: float


@dataclass(frozen=True, slots=True)
class Pair:
    """A mirrored request: the primary's and the shadow ``variant``'s outputs."""

    variant: str
    primary: list[np.ndarray] | None
    shadow: list[np.ndarray] | None
    primary_ok: bool
    shadow_ok: bool


def summarize(
    observations: Iterable[Observation],
    pairs: Iterable[Pair] = (),
    seed: int = 0,
    resamples: int = 2000,
    confidence: float = 0.95,
    baseline: str | None = None,
    min_count: int = MIN_COUNT,
) -> dict[str, Any]:
    """Per-variant figures, shadow agreement, and each variant against the baseline.

    Args:
        observations: the answered requests of every variant.
        pairs: the mirrored requests of shadow variants.
        seed: seeds the bootstrap, so that the same data gives the same report.
        resamples: bootstrap resamples (B) per interval.
        confidence: the intervals' level, in (0, 1).
        baseline: the variant the others are compared with; the most observed by default.
        min_count: fewer observations than this in either group is "not enough data".

    Returns:
        A JSON-ready dict: ``variants``, ``shadows``, ``comparisons`` and ``verdict``.
    """
    if not isinstance(resamples, int) or resamples < 1:
        raise ValueError(f"resamples must be an integer >= 1, got {resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not isinstance(min_count, int) or min_count < 1:
        raise ValueError(f"min_count must be an integer >= 1, got {min_count!r}")
    by_variant: dict[str, list[Observation]] = {}
    for o in observations:
        by_variant.setdefault(o.variant, []).append(o)
    groups = {v: _Group.of(items) for v, items in sorted(by_variant.items())}
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} has no observations; variants: {list(groups)}")
    if baseline is None and groups:
        baseline = max(groups, key=lambda v: groups[v].count)  # ties: the first by name
    total = sum(g.count for g in groups.values())
    times = np.array([t for g in groups.values() for t in g.times])
    times = times[np.isfinite(times)]
    span_s = max(float(times.max() - times.min()), 1e-9) if times.size else None
    rng = np.random.default_rng(seed)
    comparisons = [
        _compare(v, g, baseline, groups[baseline], rng, resamples, confidence, min_count)
        for v, g in groups.items()
        if baseline is not None and v != baseline
    ]
    return {
        "observations": total,
        "span_s": span_s,
        "baseline": baseline,
        "confidence": confidence,
        "resamples": resamples,
        "seed": seed,
        "min_count": min_count,
        "variants": {v: g.figures(total, span_s) for v, g in groups.items()},
        "shadows": _shadows(pairs),
        "comparisons": comparisons,
        "verdict": _overall(comparisons, baseline),
    }


@dataclass(frozen=True)
class _Group:
    count: int
    errors: int
    expired: int
    latency_ms: np.ndarray  # the finite total_ms
    times: list[float]

    @classmethod
    def of(cls, items: Sequence[Observation]) -> _Group:
        latency = np.array([o.total_ms for o in items], dtype=np.float64)
        return cls(
            count=len(items),
            errors=sum(o.status == "error" for o in items),
            expired=sum(o.status == "expired" for o in items),
            latency_ms=latency[np.isfinite(latency)],
            times=[o.time_s for o in items],
        )

    def figures(self, total: int, span_s: float | None) -> dict[str, Any]:
        quantiles: list[float | None] = [None] * len(_LEVELS)
        if self.latency_ms.size:
            quantiles = np.quantile(self.latency_ms, _LEVELS, method=_METHOD).tolist()
        return {
            "count": self.count,
            "share": self.count / total,
            "throughput_rps": self.count / span_s if span_s is not None else None,
            "p50_ms": quantiles[0],
            "p95_ms": quantiles[1],
            "p99_ms": quantiles[2],
            "error_rate": self.errors / self.count,
            "expired_rate": self.expired / self.count,
        }


def _bootstrap_quantiles(x: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The (p50, p99) of ``resamples`` resamples of ``x``, as a (resamples, 2) array; the
    index matrix is drawn a chunk of rows at a time to bound memory."""
    rows = max(1, _CHUNK_INDICES // x.size)
    out = np.empty((resamples, 2))
    for start in range(0, resamples, rows):
        k = min(rows, resamples - start)
        idx = rng.integers(0, x.size, size=(k, x.size))
        out[start : start + k] = np.quantile(x[idx], (0.5, 0.99), axis=1, method=_METHOD).T
    return out


def _interval(diff: float, draws: np.ndarray, confidence: float) -> dict[str, Any]:
    tails = ((1 - confidence) / 2, (1 + confidence) / 2)
    low, high = np.quantile(draws, tails, method=_METHOD)
    return {"diff": float(diff), "ci": [float(low), float(high)]}


def _compare(
    variant: str,
    g: _Group,
    baseline: str,
    b: _Group,
    rng: np.random.Generator,
    resamples: int,
    confidence: float,
    min_count: int,
) -> dict[str, Any]:
    p50: dict[str, Any] | None = None
    p99: dict[str, Any] | None = None
    if g.latency_ms.size and b.latency_ms.size:
        draws = _bootstrap_quantiles(g.latency_ms, resamples, rng)
        draws -= _bootstrap_quantiles(b.latency_ms, resamples, rng)
        point = np.quantile(g.latency_ms, (0.5, 0.99), method=_METHOD) - np.quantile(
            b.latency_ms, (0.5, 0.99), method=_METHOD
        )
        p50 = _interval(point[0], draws[:, 0], confidence)
        p99 = _interval(point[1], draws[:, 1], confidence)
    rate_g, rate_b = g.errors / g.count, b.errors / b.count
    error_draws = (
        rng.binomial(g.count, rate_g, resamples) / g.count
        - rng.binomial(b.count, rate_b, resamples) / b.count
    )
    error_rate = _interval(rate_g - rate_b, error_draws, confidence)
    verdict, basis = _verdict(
        variant, g.count, baseline, b.count, p99, error_rate, confidence, min_count
    )
    return {
        "variant": variant,
        "baseline": baseline,
        "count": g.count,
        "baseline_count": b.count,
        "p50_ms": p50,
        "p99_ms": p99,
        "error_rate": error_rate,
        "verdict": verdict,
        "verdict_basis": basis,
    }


def _verdict(
    variant: str,
    n: int,
    baseline: str,
    n_baseline: int,
    p99: dict[str, Any] | None,
    error_rate: dict[str, Any],
    confidence: float,
    min_count: int,
) -> tuple[str, str | None]:
    """The sentence for one comparison, and what decided it ("error_rate", "p99_ms" or None):
    an error-rate difference whose interval excludes 0 first, then p99, else not enough data."""
    level = f"{confidence * 100:g} %"
    if n >= min_count and n_baseline >= min_count:
        if _excludes_zero(error_rate):
            d, low, high = _nums(abs(error_rate["diff"]) * 100, *_magnitudes(error_rate["ci"], 100))
            word = "higher" if error_rate["ci"][0] > 0 else "lower"
            return (
                f"{variant}'s error rate is {d} points {word} ({level} CI {low}–{high})",
                "error_rate",
            )
        if p99 is not None and _excludes_zero(p99):
            d, low, high = _nums(abs(p99["diff"]), *_magnitudes(p99["ci"]))
            word = "slower" if p99["ci"][0] > 0 else "faster"
            return (
                f"{variant} is {d} ms {word} at p99 ({level} CI {low}–{high} ms)",
                "p99_ms",
            )
    if n >= min_count > n_baseline:
        short = min_count - n_baseline
        return f"not enough data: about {short:,} more requests to {baseline} needed", None
    estimates = [e for e in (_more_needed(n, p99), _more_needed(n, error_rate)) if e is not None]
    floor = max(min_count - n, 0)
    if not estimates and not floor:
        return f"no difference: {variant} and {baseline} have the same p99 and error rate", None
    # The intervals include 0 here (or a group is short): at least one more request.
    more = max(min(estimates, default=0), floor, 1)
    return f"not enough data: about {more:,} more requests to {variant} needed", None


def _more_needed(n: int, metric: dict[str, Any] | None) -> int | None:
    """More observations of the variant before ``metric``'s interval would exclude 0.

    The interval's width goes as 1/sqrt(n) (both groups growing in proportion, as a fixed
    split makes them), so its half on the side of 0, w, falls below the difference d at
    n x (w/|d|)^2; None where d is 0 (no amount of data tells it from 0).
    """
    if metric is None or metric["diff"] == 0:
        return None
    d, (low, high) = metric["diff"], metric["ci"]
    w = max(d - low if d > 0 else high - d, 0.0)
    needed = n * (w / abs(d)) ** 2
    if not math.isfinite(needed):
        return None
    return max(0, math.ceil(needed - n))


def _excludes_zero(metric: dict[str, Any]) -> bool:
    low, high = metric["ci"]
    return bool(low > 0 or high < 0)


def _magnitudes(ci: list[float], scale: float = 1.0) -> tuple[float, float]:
    """An interval that excludes 0 as sizes of the difference: (-3.8, -2.4) -> (2.4, 3.8)."""
    low, high = sorted(abs(v * scale) for v in ci)
    return low, high


def _nums(d: float, low: float, high: float) -> tuple[str, str, str]:
    """A difference and its interval at one precision: one decimal from 1 up, two significant
    digits of the difference below (0.042, not 0.0)."""
    decimals = 1 if d >= 0.95 or d == 0 else max(1, 1 - math.floor(math.log10(d)))
    return f"{d:.{decimals}f}", f"{low:.{decimals}f}", f"{high:.{decimals}f}"


def _overall(comparisons: list[dict[str, Any]], baseline: str | None) -> str:
    if baseline is None:
        return "no responses with a variant"
    if not comparisons:
        return f"only one variant ({baseline}): nothing to compare"
    rank = {"error_rate": 0, "p99_ms": 1, None: 2}
    ordered = sorted(comparisons, key=lambda c: rank[c["verdict_basis"]])
    return "; ".join(c["verdict"] for c in ordered)


def _shadows(pairs: Iterable[Pair]) -> dict[str, dict[str, Any]]:
    """Agreement of each shadow variant with its primary, on the first output.

    ``top1_agreement`` is over all pairs (a failed side counts as a disagreement);
    ``max_abs_diff`` and ``mean_abs_diff`` are over every element of the ``compared`` pairs:
    both ok, numeric, of equal shapes.
    """
    stats: dict[str, dict[str, Any]] = {}
    for p in pairs:
        s = stats.setdefault(
            p.variant,
            {"pairs": 0, "both_ok": 0, "compared": 0, "agree": 0, "max": 0.0, "sum": 0.0, "n": 0},
        )
        s["pairs"] += 1
        if not (p.primary_ok and p.shadow_ok and p.primary and p.shadow):
            continue
        s["both_ok"] += 1
        a, b = p.primary[0], p.shadow[0]
        if a.shape != b.shape or a.dtype.kind not in "biuf" or b.dtype.kind not in "biuf":
            continue
        s["compared"] += 1
        if a.size:
            s["agree"] += bool((_top1(a) == _top1(b)).all())
            diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
            s["max"] = max(s["max"], float(diff.max()))
            s["sum"] += float(diff.sum())
            s["n"] += diff.size
    return {
        v: {
            "pairs": s["pairs"],
            "both_ok": s["both_ok"],
            "compared": s["compared"],
            "top1_agreement": s["agree"] / s["pairs"],
            "max_abs_diff": s["max"] if s["n"] else None,
            "mean_abs_diff": s["sum"] / s["n"] if s["n"] else None,
        }
        for v, s in sorted(stats.items())
    }


def _top1(x: np.ndarray) -> np.ndarray:
    """The argmax of each row (along the last axis) of an output."""
    return x.reshape(-1, x.shape[-1]).argmax(axis=1) if x.ndim else np.zeros(1, dtype=np.intp)


def format_report(summary: dict[str, Any]) -> str:
    """The summary as text: the per-variant table, shadow agreement, the comparisons with
    their intervals, any notes, and the verdict on the last line."""
    level = f"{summary['confidence'] * 100:g} %"
    names = {v: f"{v} (baseline)" if v == summary["baseline"] else v for v in summary["variants"]}
    width = max([len("variant"), *map(len, names.values())])
    header = ("count", "share %", "req/s", "p50 ms", "p95 ms", "p99 ms", "error %", "expired %")
    lines = ["variant".ljust(width) + "".join(f"{h:>11}" for h in header)]
    for v, f in summary["variants"].items():
        cells = (
            str(f["count"]),
            _fixed(f["share"] * 100),
            _fixed(f["throughput_rps"]),
            _fixed(f["p50_ms"]),
            _fixed(f["p95_ms"]),
            _fixed(f["p99_ms"]),
            _fixed(f["error_rate"] * 100),
            _fixed(f["expired_rate"] * 100),
        )
        lines.append(names[v].ljust(width) + "".join(f"{c:>11}" for c in cells))
    for v, s in summary["shadows"].items():
        lines.append(
            f"shadow {v}: {s['pairs']} pairs, {s['both_ok']} both ok, top-1 agreement "
            f"{s['top1_agreement'] * 100:.1f} %, max |diff| {_fixed(s['max_abs_diff'], '.3g')}, "
            f"mean |diff| {_fixed(s['mean_abs_diff'], '.3g')}"
        )
    for c in summary["comparisons"]:
        lines.append(
            f"{c['variant']} vs {c['baseline']} ({c['count']} vs {c['baseline_count']} requests):"
        )
        for key, label, unit, scale in (
            ("p50_ms", "p50", "ms", 1),
            ("p99_ms", "p99", "ms", 1),
            ("error_rate", "error rate", "points", 100),
        ):
            m = c[key]
            if m is None:
                lines.append(f"  {label:<10}  no latencies")
                continue
            low, high = (v * scale for v in m["ci"])
            lines.append(
                f"  {label:<10} {m['diff'] * scale:+9.2f} {unit:<6}  "
                f"{level} CI [{low:+.2f}, {high:+.2f}]"
            )
        lines.append(f"  {c['verdict']}")
    lines.extend(f"note: {n}" for n in summary.get("notes", ()))
    lines.append(f"verdict: {summary['verdict']}")
    return "\n".join(lines)


def _fixed(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


# --- Reading the topics -------------------------------------------------------------------


_ShadowRecord = codec.ShadowRecord
_shadow_msgpack = msgspec.msgpack.Decoder(_ShadowRecord)
_UNREADABLE = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError, ValueError, TypeError)


@dataclass
class _Collected:
    """What `collect` read, and notes on anything that limits the report."""

    observations: list[Observation]
    pairs: list[Pair]
    notes: list[str]


def collect(
    settings: Settings,
    model: str | None,
    responses_topic: str | None = None,
    shadow_topic: str | None = None,
    timeout_s: float = 30.0,
    max_records: int = MAX_RECORDS,
) -> tuple[list[Observation], list[Pair]]:
    """The observations and shadow pairs on the topics, from their beginnings to their high
    watermarks when reading starts (see `_collect`)."""
    got = _collect(settings, model, responses_topic, shadow_topic, timeout_s, max_records)
    for note in got.notes:
        log.warning("experiment report: %s", note)
    return got.observations, got.pairs


def _collect(
    settings: Settings,
    model: str | None,
    responses_topic: str | None = None,
    shadow_topic: str | None = None,
    timeout_s: float = 30.0,
    max_records: int = MAX_RECORDS,
) -> _Collected:
    """Read the responses and shadow topics for a report.

    Each topic is read from its beginning up to its high watermarks taken when its reading
    starts, for at most ``timeout_s`` and ``max_records`` records; the notes say where either
    bound cut a topic short. Only responses that name a variant (and of ``model``, if given)
    count; a missing shadow topic means no pairs.
    """
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
    if not isinstance(max_records, int) or max_records < 1:
        raise ValueError(f"max_records must be an integer >= 1, got {max_records!r}")
    responses_topic = responses_topic or settings.responses_topic
    shadow_topic = (
        shadow_topic or getattr(settings, "shadow_topic", None) or f"{settings.topic_prefix}.shadow"
    )
    notes: list[str] = []
    observations: list[Observation] = []

    def on_response(m: Any) -> None:
        o = _observation(m, model)
        if o is not None:
            observations.append(o)

    _read(settings, responses_topic, on_response, timeout_s, max_records, notes)
    pairing = _Pairing(model)
    try:
        _read(settings, shadow_topic, pairing.add, timeout_s, max_records, notes)
    except _NoTopic:
        notes.append(f"no shadow topic {shadow_topic!r}: no shadow pairs")
    if pairing.unpaired:
        notes.append(f"{shadow_topic}: {pairing.unpaired} requests without both records left out")
    return _Collected(observations, pairing.pairs, notes)


def report_command_output(
    settings: Settings, model: str | None, as_json: bool, since_s: float | None = None
) -> str:
    """What ``sluice experiment report`` prints: the table, or the summary as JSON. With
    ``since_s``, only the answers of the last ``since_s`` seconds on the topic count (the
    variants of one config compared over the same stretch of load)."""
    got = _collect(settings, model)
    observations = got.observations
    if since_s is not None and observations:
        start = max(o.time_s for o in observations) - since_s
        observations = [o for o in observations if o.time_s >= start]
        got.notes.append(f"only the answers of the last {since_s:g} s on the topic")
    summary = summarize(observations, got.pairs)
    summary["notes"] = got.notes
    if as_json:
        return json.dumps(summary, sort_keys=True, allow_nan=False)
    return format_report(summary)


class _NoTopic(RuntimeError):
    pass


def _read(
    settings: Settings,
    topic: str,
    on_record: Callable[[Any], None],
    timeout_s: float,
    max_records: int,
    notes: list[str],
) -> None:
    """Hand each record of ``topic`` below the high watermarks to ``on_record``."""
    group = f"{settings.topic_prefix}-experiment-report-{uuid.uuid4().hex[:12]}"
    try:
        consumer = topic_reader(settings, topic, group, "read_committed")
    except RuntimeError as exc:
        raise _NoTopic(str(exc)) from None
    read = unreadable = 0
    try:
        ends: dict[int, int] = {}
        for tp in consumer.assignment():
            end = high_watermark(consumer, topic, tp.partition)
            low, _ = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), 10)
            if low < end:
                ends[tp.partition] = end
        deadline = time.monotonic() + timeout_s
        while ends:
            if read >= max_records:
                notes.append(f"{topic}: stopped at the cap of {max_records:,} records")
                break
            if time.monotonic() >= deadline:
                notes.append(
                    f"{topic}: partitions {sorted(ends)} not read to their end within "
                    f"{timeout_s:g} s"
                )
                break
            for m in consume_batch(consumer, min(1000, max_records - read), 0.5):
                if m.error() is not None or m.offset() >= ends.get(m.partition(), -1):
                    continue
                read += 1
                try:
                    on_record(m)
                except _UNREADABLE:
                    unreadable += 1
            # The position, not the last record's offset: a transaction's commit marker
            # takes an offset that no record is delivered at.
            for tp in consumer.position([TopicPartition(topic, p) for p in ends]):
                if tp.offset >= ends[tp.partition]:
                    del ends[tp.partition]
    finally:
        consumer.close()
    if unreadable:
        notes.append(f"{topic}: {unreadable} unreadable records left out")


def _observation(m: Any, model: str | None) -> Observation | None:
    raw, fmt = m.value(), codec.content_type(m.headers())
    if raw is None:
        raise ValueError("tombstone")
    response = codec.decode_response(raw, fmt)
    variant = response.variant
    if not variant or (model is not None and response.model != model):
        return None
    kind, ts_ms = m.timestamp()
    return Observation(
        variant=variant,
        status=response.status,
        total_ms=response.timings.total_ms if response.timings is not None else math.nan,
        time_s=ts_ms / 1000 if kind != TIMESTAMP_NOT_AVAILABLE else math.nan,
    )


class _Pairing:
    """Shadow records by request id, paired primary with shadow as both arrive."""

    def __init__(self, model: str | None) -> None:
        self.model = model
        self.pairs: list[Pair] = []
        self._waiting: dict[str, _ShadowRecord] = {}
        self._done: set[str] = set()

    @property
    def unpaired(self) -> int:
        return len(self._waiting)

    def add(self, m: Any) -> None:
        raw, fmt = m.value(), codec.content_type(m.headers())
        if raw is None:
            raise ValueError("tombstone")
        record = _shadow_msgpack.decode(raw) if fmt == codec.MSGPACK else codec.decode_shadow(raw)
        if record.role not in ("primary", "shadow"):
            raise ValueError(f"unknown role {record.role!r}")
        if (self.model is not None and record.model != self.model) or record.id in self._done:
            return
        other = self._waiting.get(record.id)
        if other is None or other.role == record.role:  # a redelivered record: keep the first
            self._waiting.setdefault(record.id, record)
            return
        del self._waiting[record.id]
        self._done.add(record.id)
        primary, shadow = (record, other) if record.role == "primary" else (other, record)
        primary_arrays, shadow_arrays = _arrays(primary), _arrays(shadow)
        self.pairs.append(
            Pair(
                variant=shadow.variant or "shadow",
                primary=primary_arrays,
                shadow=shadow_arrays,
                primary_ok=primary.status == "ok" and primary_arrays is not None,
                shadow_ok=shadow.status == "ok" and shadow_arrays is not None,
            )
        )


def _arrays(record: _ShadowRecord) -> list[np.ndarray] | None:
    """The record's outputs as arrays (`codec.tensor_values`: response tensors, already
    shaped by the server), or None where it has none or they do not decode."""
    if record.outputs is None:
        return None
    try:
        return [codec.tensor_values(t) for t in record.outputs]
    except (ValueError, TypeError, KeyError):
        return None
