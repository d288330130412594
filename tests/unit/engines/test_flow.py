"""Flow control without a broker: backpressure decides on the lag it last read plus what the
stage produced since, and one owner pauses and resumes exactly the partitions whose state
changes (all of them for backpressure, the non-priority ones for a priority backlog)."""

from __future__ import annotations

from confluent_kafka import TopicPartition

from pipeline.config import Settings
from pipeline.engines.flow import Backpressure, FlowControl


class Consumer:
    """What `FlowControl` asks of a consumer: positions, cached watermarks, pause, resume."""

    def __init__(self) -> None:
        self.paused: set[tuple[str, int]] = set()
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []
        self.high = {("p", 0): 0}

    def position(self, tps: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, 0) for tp in tps]

    def get_watermark_offsets(self, tp: TopicPartition, cached: bool) -> tuple[int, int]:
        return 0, self.high[(tp.topic, tp.partition)]

    def pause(self, tps: list[TopicPartition]) -> None:
        got = sorted((tp.topic, tp.partition) for tp in tps)
        self.calls.append(("pause", got))
        self.paused |= set(got)

    def resume(self, tps: list[TopicPartition]) -> None:
        got = sorted((tp.topic, tp.partition) for tp in tps)
        self.calls.append(("resume", got))
        self.paused -= set(got)


def backpressure(reads: list[int]) -> Backpressure:
    settings = Settings(
        bootstrap="127.0.0.1:9",
        backpressure_high_water=300,
        backpressure_low_water=100,
        backpressure_interval_s=60,
    )
    bp = Backpressure(settings, "g", ["down"])
    feed = iter(reads)
    bp.lag = lambda: next(feed)  # type: ignore[method-assign]
    return bp


def test_backpressure_counts_what_it_forwarded_since_the_last_read() -> None:
    """Between two reads of the broker's lag, the records this process produced downstream
    count: it pauses as soon as they cross the high-water mark, not at the next read."""
    bp = backpressure([0, 50])
    assert not bp.update()  # reads 0
    bp.sent = 250
    assert not bp.update() and bp.estimate() == 250  # no read due: 250 unseen
    bp.sent, bp.delivered = 301, 120  # delivered or not, the last read saw none of them
    assert bp.update() and bp.estimate() == 301
    bp.delivered = 301
    bp._next_check = 0.0  # the next read is due: it sees everything delivered
    assert not bp.update() and bp.estimate() == 50  # reads 50 < 100: resumes


def test_one_owner_pauses_for_priority_and_for_backpressure() -> None:
    consumer = Consumer()
    bp = backpressure([0, 1_000, 0])
    flow = FlowControl(consumer, "p", bp)
    flow.assigned([TopicPartition("p", 0), TopicPartition("r", 0), TopicPartition("r", 1)])
    flow.update()
    assert consumer.calls == []  # no backlog anywhere

    consumer.high[("p", 0)] = 3  # a priority backlog: the requests topic waits
    flow.update()
    assert consumer.paused == {("r", 0), ("r", 1)}

    bp._next_check = 0.0  # downstream lags 1,000: everything waits, the rest paused only once
    flow.update()
    assert consumer.paused == {("p", 0), ("r", 0), ("r", 1)}
    assert consumer.calls[-1] == ("pause", [("p", 0)])

    consumer.high[("p", 0)] = 0
    bp._next_check = 0.0  # the lag drains and the priority backlog is gone: all resume
    flow.update()
    assert consumer.paused == set()
    assert consumer.calls[-1] == ("resume", [("p", 0), ("r", 0), ("r", 1)])


def test_a_stage_without_requests_never_pauses_for_priority() -> None:
    consumer = Consumer()
    flow = FlowControl(consumer, None, None)
    flow.assigned([TopicPartition("results", 0)])
    flow.update()
    assert consumer.calls == []
