"""The experiment report: per-variant figures, bootstrap intervals and verdicts on synthetic
data with known answers, shadow agreement, the text report, and reading the topics through a
fake consumer."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TopicPartition

from pipeline.config import Settings
from pipeline.experiments import report
from pipeline.experiments.report import Observation, Pair, format_report, summarize
from pipeline.protocol import codec

SLOWER = re.compile(r"^b is (\d+\.\d+) ms slower at p99 \(95 % CI (\d+\.\d+)–(\d+\.\d+) ms\)$")
FASTER = re.compile(r"^b is (\d+\.\d+) ms faster at p99 \(95 % CI (\d+\.\d+)–(\d+\.\d+) ms\)$")
MORE = re.compile(r"^not enough data: about ([\d,]+) more requests to (\w+) needed$")
ERROR_HIGHER = re.compile(
    r"^(\w+)'s error rate is (\d+\.\d+) points higher \(95 % CI (\d+\.\d+)–(\d+\.\d+)\)$"
)


def observations(
    variant: str,
    latency_ms: Sequence[float],
    error_rate: float = 0.0,
    seed: int = 0,
    start_s: float = 0.0,
) -> list[Observation]:
    """One observation per latency, a second apart; a seeded ``error_rate`` of them errors."""
    errors = np.random.default_rng(seed).random(len(latency_ms)) < error_rate
    return [
        Observation(variant, "error" if e else "ok", float(ms), start_s + i)
        for i, (ms, e) in enumerate(zip(latency_ms, errors, strict=True))
    ]


def normal(mean: float, n: int, seed: int, sd: float = 2.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(mean, sd, n)


def test_counts_shares_rates_and_percentiles() -> None:
    a = [Observation("a", s, ms, t) for s, ms, t in [
        ("ok", 10.0, 0.0), ("ok", 12.0, 1.0), ("error", 30.0, 2.0), ("ok", 11.0, 3.0),
        ("expired", 50.0, 4.0), ("ok", 13.0, 5.0),
    ]]  # fmt: skip
    # b's third response carries no timings: counted, but not in its latency.
    b = [Observation("b", s, ms, t) for s, ms, t in [
        ("ok", 7.0, 2.5), ("ok", 9.0, 8.0), ("error", math.nan, 9.0), ("ok", 8.0, 10.0),
    ]]  # fmt: skip
    summary = summarize(a + b, resamples=50)
    va, vb = summary["variants"]["a"], summary["variants"]["b"]
    assert summary["observations"] == 10
    assert summary["baseline"] == "a"  # the most observed
    assert (va["count"], vb["count"]) == (6, 4)
    assert va["share"] == pytest.approx(0.6, abs=1e-9) and vb["share"] == pytest.approx(
        0.4, abs=1e-9
    )
    # The span is over all observations: 0 s to 10 s.
    assert va["throughput_rps"] == pytest.approx(0.6, abs=1e-9) and vb[
        "throughput_rps"
    ] == pytest.approx(0.4, abs=1e-9)
    assert va["error_rate"] == pytest.approx(1 / 6, abs=1e-9) and va[
        "expired_rate"
    ] == pytest.approx(1 / 6, abs=1e-9)
    assert vb["error_rate"] == pytest.approx(1 / 4, abs=1e-9) and vb[
        "expired_rate"
    ] == pytest.approx(0.0, abs=1e-9)
    for figures, latency in ((va, [10, 12, 30, 11, 50, 13]), (vb, [7, 9, 8])):
        expected = np.quantile(latency, [0.5, 0.95, 0.99], method="linear")
        got = [figures["p50_ms"], figures["p95_ms"], figures["p99_ms"]]
        assert got == pytest.approx(expected, rel=1e-12)
    assert va["p50_ms"] == pytest.approx(12.5, abs=1e-9)  # by hand: halfway between 12 and 13
    assert vb["p95_ms"] == pytest.approx(8.9, abs=1e-9)  # 9 - 0.1 x (9 - 8)
    (comparison,) = summary["comparisons"]
    assert comparison["variant"] == "b" and comparison["baseline"] == "a"
    assert comparison["p50_ms"]["diff"] == pytest.approx(8.0 - 12.5, abs=1e-9)
    assert comparison["error_rate"]["diff"] == pytest.approx(1 / 4 - 1 / 6, abs=1e-9)
    # Both groups are under min_count, whatever the intervals say.
    assert MORE.match(comparison["verdict"])


def test_an_explicit_baseline_and_bad_arguments() -> None:
    obs = observations("a", [1.0] * 5) + observations("b", [2.0] * 3)
    assert summarize(obs, baseline="b", resamples=10)["comparisons"][0]["variant"] == "a"
    with pytest.raises(ValueError, match="baseline 'c' has no observations"):
        summarize(obs, baseline="c")
    with pytest.raises(ValueError, match="resamples must be an integer >= 1, got 0"):
        summarize(obs, resamples=0)
    with pytest.raises(ValueError, match="confidence must be in"):
        summarize(obs, confidence=1.0)


def test_nothing_to_compare() -> None:
    assert summarize([])["verdict"] == "no responses with a variant"
    only = summarize(observations("a", [1.0, 2.0]), resamples=10)
    assert only["verdict"] == "only one variant (a): nothing to compare"
    assert only["comparisons"] == []


@pytest.mark.parametrize(("shift_ms", "pattern"), [(3.0, SLOWER), (-3.0, FASTER)])
def test_a_known_shift_is_found_and_its_interval_covers_it(
    shift_ms: float, pattern: re.Pattern[str]
) -> None:
    # Independent samples: b's true p50 and p99 are a's plus the shift.
    a = observations("a", normal(20.0, 2000, seed=1))
    b = observations("b", normal(20.0 + shift_ms, 2000, seed=2), start_s=0.5)
    summary = summarize(a + b)
    (c,) = summary["comparisons"]
    for key in ("p50_ms", "p99_ms"):
        low, high = c[key]["ci"]
        assert low < shift_ms < high, (key, c[key])
        assert not low <= 0 <= high, (key, c[key])
        assert c[key]["diff"] == pytest.approx(shift_ms, abs=0.6)
    assert c["verdict_basis"] == "p99_ms"
    match = pattern.match(c["verdict"])
    assert match, c["verdict"]
    figure, low, high = map(float, match.groups())
    assert figure == pytest.approx(3.0, abs=0.6)
    assert low < figure < high  # magnitudes, in order, whichever the direction
    assert summary["verdict"] == c["verdict"]


def test_identical_distributions_are_not_enough_data() -> None:
    a = observations("a", normal(20.0, 2000, seed=3))
    b = observations("b", normal(20.0, 2000, seed=4))
    summary = summarize(a + b)
    (c,) = summary["comparisons"]
    low, high = c["p99_ms"]["ci"]
    assert low < 0 < high
    match = MORE.match(c["verdict"])
    assert match and match.group(2) == "b", c["verdict"]
    more = int(match.group(1).replace(",", ""))
    assert more > 0
    # No errors on either side (no difference to estimate from): the estimate is p99's, from
    # the half of its interval on the side of 0.
    d = c["p99_ms"]["diff"]
    w = d - low if d > 0 else high - d
    assert more == max(1, math.ceil(2000 * (w / abs(d)) ** 2 - 2000))
    assert summary["verdict"] == c["verdict"]


def test_too_few_observations_is_not_enough_data_whatever_the_interval() -> None:
    a = observations("a", normal(20.0, 1000, seed=5))
    b = observations("b", normal(40.0, 40, seed=6))  # far slower, but 40 < min_count
    (c,) = summarize(a + b)["comparisons"]
    assert c["p99_ms"]["ci"][0] > 0
    match = MORE.match(c["verdict"])
    assert match, c["verdict"]
    assert int(match.group(1)) == 60  # min_count - n_b: the interval itself already excludes 0


def test_an_error_rate_difference_comes_first() -> None:
    a = observations("a", normal(20.0, 2000, seed=7), error_rate=0.01, seed=8)
    b = observations("b", normal(23.0, 2000, seed=9), error_rate=0.08, seed=10)
    (c,) = summarize(a + b)["comparisons"]
    assert c["p99_ms"]["ci"][0] > 0  # b is slower too, significantly
    assert c["verdict_basis"] == "error_rate"
    match = ERROR_HIGHER.match(c["verdict"])
    assert match, c["verdict"]
    points, low, high = map(float, match.groups()[1:])
    assert points == pytest.approx(7.0, abs=2.0)  # 3 sd of the realised rates
    assert low < points < high


def test_the_overall_verdict_puts_error_rates_before_p99() -> None:
    a = observations("a", normal(20.0, 3000, seed=11), error_rate=0.01, seed=12)
    b = observations("b", normal(23.0, 2000, seed=13), error_rate=0.01, seed=14)
    c = observations("c", normal(20.0, 2000, seed=15), error_rate=0.08, seed=16)
    summary = summarize(a + b + c)
    by_variant = {x["variant"]: x for x in summary["comparisons"]}
    assert by_variant["b"]["verdict_basis"] == "p99_ms"
    assert by_variant["c"]["verdict_basis"] == "error_rate"
    assert summary["verdict"] == f"{by_variant['c']['verdict']}; {by_variant['b']['verdict']}"


def shifted_with_errors() -> list[Observation]:
    a = observations("a", normal(20.0, 2000, seed=17), error_rate=0.02, seed=18)
    b = observations("b", normal(23.0, 2000, seed=19), error_rate=0.03, seed=20)
    return a + b


def test_a_seed_makes_a_report_reproducible() -> None:
    obs = shifted_with_errors()
    assert summarize(obs, seed=5) == summarize(obs, seed=5)


def test_other_seeds_give_nearly_the_same_intervals() -> None:
    obs = shifted_with_errors()
    (one,) = summarize(obs, seed=1)["comparisons"]
    (two,) = summarize(obs, seed=2)["comparisons"]
    assert one["p99_ms"]["ci"] != two["p99_ms"]["ci"]
    # Monte Carlo error of a 2.5 % quantile of 2000 resamples: about 0.015 ms for p99 here,
    # 0.005 ms for p50 and 0.03 points for the error rate; the tolerances are several times that.
    assert one["p99_ms"]["ci"] == pytest.approx(two["p99_ms"]["ci"], abs=0.1)
    assert one["p50_ms"]["ci"] == pytest.approx(two["p50_ms"]["ci"], abs=0.05)
    assert one["error_rate"]["ci"] == pytest.approx(two["error_rate"]["ci"], abs=0.002)


class SpyGenerator:
    """A generator that records the shape of every index matrix it draws."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.shapes: list[tuple[int, int]] = []

    def integers(self, low: int, high: int, size: tuple[int, int]) -> np.ndarray:
        self.shapes.append(size)
        return self.rng.integers(low, high, size=size)


def test_the_index_matrix_is_drawn_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    x = normal(20.0, 1000, seed=21)
    monkeypatch.setattr(report, "_CHUNK_INDICES", 3 * 1000 + 1)  # 3 rows a chunk
    spy = SpyGenerator(0)
    draws = report._bootstrap_quantiles(x, 500, spy)  # type: ignore[arg-type]
    assert all(rows * n <= 3001 for rows, n in spy.shapes)
    assert sum(rows for rows, _ in spy.shapes) == 500  # the last chunk is the 2 left over
    assert draws.shape == (500, 2)
    assert ((x.min() <= draws) & (draws <= x.max())).all()
    # The same statistic as one unchunked draw, up to Monte Carlo error (about 0.01 ms).
    whole = report._bootstrap_quantiles(x, 500, np.random.default_rng(1))
    assert draws.mean(axis=0) == pytest.approx(whole.mean(axis=0), abs=0.05)


def test_large_groups_run_with_bounded_memory() -> None:
    # 2000 resamples of 100,000 would be 2e8 indices (1.6 GB) drawn at once.
    a = observations("a", normal(20.0, 100_000, seed=22))
    b = observations("b", normal(20.5, 2_000, seed=23))
    (c,) = summarize(a + b, resamples=2000)["comparisons"]
    low, high = c["p99_ms"]["ci"]
    assert math.isfinite(low) and math.isfinite(high) and low < high


def test_shadow_agreement() -> None:
    def arr(rows: list[list[float]]) -> list[np.ndarray]:
        return [np.array(rows, dtype=np.float64)]

    pairs = [
        # both ok, same top-1; |diff| 0.1, 0.2, 0.1
        Pair("s", arr([[0.1, 0.9, 0.0]]), arr([[0.2, 0.7, 0.1]]), True, True),
        # both ok, different top-1; |diff| 0.3, 0.1, 0.2
        Pair("s", arr([[0.6, 0.4, 0.0]]), arr([[0.3, 0.5, 0.2]]), True, True),
        # the shadow failed: a disagreement, not compared
        Pair("s", arr([[0.6, 0.4, 0.0]]), None, True, False),
        # both ok but of other shapes: not compared
        Pair("s", arr([[0.6, 0.4, 0.0]]), arr([[0.6, 0.4, 0.0, 0.0]]), True, True),
        # two rows, each with the same top-1; |diff| 0, 0, 1, 1, 0, 0
        Pair("s", arr([[1, 2, 3], [3, 2, 1]]), arr([[1, 2, 4], [4, 2, 1]]), True, True),
        Pair("t", None, arr([[1.0]]), False, True),
    ]
    shadows = summarize([], pairs)["shadows"]
    s = shadows["s"]
    assert (s["pairs"], s["both_ok"], s["compared"]) == (5, 4, 3)
    assert s["top1_agreement"] == pytest.approx(2 / 5, abs=1e-9)
    # Decimal fractions are not exact in binary: 0.9 - 0.7 is 0.20000000000000007.
    assert s["max_abs_diff"] == pytest.approx(1.0, abs=1e-9)
    assert s["mean_abs_diff"] == pytest.approx((0.4 + 0.6 + 2.0) / 12, abs=1e-9)
    t = shadows["t"]
    assert t["pairs"] == 1 and t["top1_agreement"] == 0
    assert t["max_abs_diff"] is None and t["mean_abs_diff"] is None


def test_format_report_lists_every_variant_and_ends_with_the_verdict() -> None:
    obs = shifted_with_errors() + observations("c", normal(20.0, 50, seed=24), start_s=1.0)
    pairs = [Pair("shadow-1", [np.eye(3)], [np.eye(3)], True, True)]
    summary = summarize(obs, pairs, resamples=200)
    summary["notes"] = ["sluice.responses: 3 unreadable records left out"]
    text = format_report(summary)
    lines = text.splitlines()
    header = lines[0].split()
    assert header[:3] == ["variant", "count", "share"]
    rows = {line.split()[0]: line for line in lines[1:4]}
    assert set(rows) == {"a", "b", "c"}
    assert "(baseline)" in rows["a"]
    assert rows["c"].split()[1] == "50"
    assert any(line.startswith("shadow shadow-1: 1 pairs") for line in lines)
    assert any(line.startswith("b vs a (2000 vs 2000 requests)") for line in lines)
    assert any(line.startswith("c vs a (50 vs 2000 requests)") for line in lines)
    assert lines[-2] == "note: sluice.responses: 3 unreadable records left out"
    assert lines[-1] == f"verdict: {summary['verdict']}"


# --- Reading the topics, through a fake consumer ------------------------------------------


class FakeMessage:
    def __init__(self, partition: int, offset: int, value: bytes | None, headers: Any = None):
        self._partition, self._offset, self._value, self._headers = (
            partition, offset, value, headers,
        )  # fmt: skip

    def error(self) -> None:
        return None

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes | None:
        return self._value

    def headers(self) -> Any:
        return self._headers

    def timestamp(self) -> tuple[int, int]:
        return TIMESTAMP_CREATE_TIME, 1_000_000 + 500 * self._offset


class FakeConsumer:
    """A topic's records, partition by partition; offsets between the last record and the
    high watermark are transaction markers, which no record is delivered at."""

    def __init__(self, topic: str, partitions: dict[int, tuple[list[FakeMessage], int]]):
        self.topic = topic
        self.high = {p: high for p, (_, high) in partitions.items()}
        self.queue = [m for records, _ in partitions.values() for m in records]
        self.left = {p: len(records) for p, (records, _) in partitions.items()}
        self.closed = False

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition(self.topic, p) for p in self.high]

    def get_watermark_offsets(self, tp: TopicPartition, timeout: float) -> tuple[int, int]:
        return 0, self.high[tp.partition]

    def poll(self, timeout: float) -> FakeMessage | None:
        batch = self.consume(1, timeout)
        return batch[0] if batch else None

    def consume(self, n: int, timeout: float) -> list[FakeMessage]:
        batch, self.queue = self.queue[:n], self.queue[n:]
        for m in batch:
            self.left[m.partition()] -= 1
        return batch

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        def at(p: int) -> int:
            waiting = [m.offset() for m in self.queue if m.partition() == p]
            return waiting[0] if waiting else self.high[p]

        return [TopicPartition(self.topic, tp.partition, at(tp.partition)) for tp in tps]

    def close(self) -> None:
        self.closed = True


def response(variant: str | None, total_ms: float, status: str = "ok", model: str = "m") -> dict:
    body: dict[str, Any] = {
        "id": f"r-{variant}-{total_ms}",
        "status": status,
        "model": model,
        "timings": {"queue_ms": 0.1, "inference_ms": 1.0, "total_ms": total_ms, "batch_size": 1},
    }
    if variant is not None:
        body["variant"] = variant
    return body


def shadow_record(request_id: str, role: str, values: list[float] | None, status: str = "ok"):
    outputs = None
    if values is not None:
        outputs = [{"name": "y", "datatype": "FP32", "shape": [1, len(values)], "data": values}]
    return json.dumps(
        {"id": request_id, "model": "m", "model_version": "1",
         "variant": "a" if role == "primary" else "s",
         "role": role, "status": status, "outputs": outputs, "total_ms": 5.0}
    ).encode()  # fmt: skip


MSGPACK = [("content-type", b"application/msgpack")]


@pytest.fixture
def topics(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """The responses and shadow topics as fake consumers; records what reading them asked."""
    responses = {
        0: (
            [
                FakeMessage(0, 0, codec.encode(response("a", 10.0))),
                FakeMessage(
                    0, 1, codec.encode(response("b", 12.0, "error"), codec.MSGPACK), MSGPACK
                ),  # fmt: skip
                FakeMessage(0, 2, codec.encode(response(None, 11.0))),  # not in the experiment
                FakeMessage(0, 3, codec.encode(response("a", 9.0, model="other"))),
                FakeMessage(0, 5, codec.encode(response("a", 99.0))),  # past the watermark
            ],
            4,  # offset 4 is a commit marker: the loop must end without a record there
        ),
        1: ([FakeMessage(1, 0, b"not json"), FakeMessage(1, 1, None)], 2),
        2: ([], 0),
    }
    shadow = {
        0: (
            [
                FakeMessage(0, 0, shadow_record("r1", "primary", [0.1, 0.9])),
                FakeMessage(0, 1, shadow_record("r2", "shadow", [0.5, 0.5])),  # no primary
                FakeMessage(0, 2, shadow_record("r1", "shadow", [0.3, 0.7])),
                FakeMessage(0, 3, shadow_record("r3", "shadow", None, "error")),
                FakeMessage(0, 4, shadow_record("r3", "primary", [0.9, 0.1])),
            ],
            5,
        )
    }
    seen: dict[str, Any] = {"groups": [], "consumers": []}

    def topic_reader(settings: Settings, topic: str, group_id: str, isolation: str) -> Any:
        assert isolation == "read_committed"
        seen["groups"].append(group_id)
        partitions = {"sluice.responses": responses, "sluice.shadow": shadow}.get(topic)
        if partitions is None:
            raise RuntimeError(f"no topic {topic!r}")
        consumer = FakeConsumer(topic, partitions)
        seen["consumers"].append(consumer)
        return consumer

    monkeypatch.setattr(report, "topic_reader", topic_reader)
    monkeypatch.setattr(report, "high_watermark", lambda c, topic, p: c.high[p])
    return seen


def test_collect_reads_both_topics_to_their_watermarks(topics: dict[str, Any]) -> None:
    got = report._collect(Settings(), "m", timeout_s=5.0)
    assert got.observations == [
        Observation("a", "ok", 10.0, 1000.0),
        Observation("b", "error", 12.0, 1000.5),  # MessagePack, per its content-type
    ]
    assert [(p.variant, p.primary_ok, p.shadow_ok) for p in got.pairs] == [
        ("s", True, True),
        ("s", True, False),
    ]
    first = got.pairs[0]
    assert first.primary is not None and first.shadow is not None
    np.testing.assert_array_equal(first.primary[0], np.array([[0.1, 0.9]], dtype=np.float32))
    np.testing.assert_array_equal(first.shadow[0], np.array([[0.3, 0.7]], dtype=np.float32))
    assert got.notes == [
        "sluice.responses: 2 unreadable records left out",
        "sluice.shadow: 1 requests without both records left out",
    ]
    assert len(set(topics["groups"])) == 2  # a throwaway group per reader
    assert all(c.closed for c in topics["consumers"])


def test_collect_says_where_a_bound_cut_it_short(topics: dict[str, Any]) -> None:
    got = report._collect(Settings(), None, shadow_topic="nowhere", max_records=2)
    assert got.observations == [
        Observation("a", "ok", 10.0, 1000.0),
        Observation("b", "error", 12.0, 1000.5),
    ]
    assert got.notes == [
        "sluice.responses: stopped at the cap of 2 records",
        "no shadow topic 'nowhere': no shadow pairs",
    ]


def test_report_command_output(topics: dict[str, Any]) -> None:
    text = report.report_command_output(Settings(), "m", as_json=False)
    assert text.splitlines()[-1] == "verdict: not enough data: about 99 more requests to b needed"
    summary = json.loads(report.report_command_output(Settings(), "m", as_json=True))
    assert summary["variants"]["a"]["count"] == 1
    assert summary["shadows"]["s"]["top1_agreement"] == pytest.approx(0.5, abs=1e-9)
    assert summary["notes"][0] == "sluice.responses: 2 unreadable records left out"


def test_report_since_keeps_only_the_last_seconds(topics: dict[str, Any]) -> None:
    """The answers at 1000.0 s (a) and 1000.5 s (b): the last 0.2 s hold only b's."""
    summary = json.loads(report.report_command_output(Settings(), "m", True, since_s=0.2))
    assert set(summary["variants"]) == {"b"}
    assert "only the answers of the last 0.2 s on the topic" in summary["notes"]
    everything = json.loads(report.report_command_output(Settings(), "m", True))
    assert set(everything["variants"]) == {"a", "b"}
