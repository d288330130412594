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


Read = dict[tuple[str, int], tuple[int, int]]


def backpressure(reads: list[Read]) -> Backpressure:
    settings = Settings(
        bootstrap="127.0.0.1:9",
        backpressure_high_water=300,
        backpressure_low_water=100,
        backpressure_interval_s=60,
    )
    bp = Backpressure(settings, "g", ["down"])
    feed = iter(reads)
    bp.read = lambda: next(feed)  # type: ignore[method-assign]
    return bp


def lagging(n: int, partition: int = 0) -> Read:
    """A read: ``n`` records on ``down``'s partition, none consumed."""
    return {("down", partition): (n, 0)}


class Delivered:
    """A delivery report's message."""

    def __init__(self, partition: int, offset: int) -> None:
        self._partition, self._offset = partition, offset

    def topic(self) -> str:
        return "down"

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset


def deliver(bp: Backpressure, offsets: range, partition: int = 0) -> None:
    for offset in offsets:
        bp.report(None, Delivered(partition, offset))


def test_backpressure_counts_what_it_forwarded_since_the_last_read() -> None:
    """Between two reads of the broker's lag, the records this process produced downstream
    count: it pauses as soon as they cross the high-water mark, not at the next read."""
    bp = backpressure([lagging(0)])
    assert not bp.update()  # reads 0
    bp.sent = 250
    assert not bp.update() and bp.estimate() == 250  # no read due: 250 in flight
    deliver(bp, range(120))
    bp.sent = 301  # delivered or not, each counts once
    assert bp.update() and bp.estimate() == 301
    bp.report("failed", None)  # a failed record is no longer in flight (it is sent again)
    assert bp.estimate() == 300


def test_a_read_is_used_once_what_was_in_flight_when_it_started_is_delivered() -> None:
    """Records in flight when a read starts may or may not be in it: the read waits until
    their delivery reports say where they are, so each counts once and the stage does not
    pause below the high-water mark."""
    for seen in (256, 0):  # the read saw the 256 records, or it did not
        bp = backpressure([lagging(seen)])
        bp.sent = 256
        assert not bp.update() and bp.estimate() == 256  # the read waits: 256 in flight
        deliver(bp, range(256))
        assert not bp.update() and bp.estimate() == 256
    bp = backpressure([lagging(400)])  # another producer's records count too
    bp.sent = 256
    deliver(bp, range(256))
    assert bp.update() and bp.estimate() == 400


def test_backpressure_resumes_once_downstream_consumes() -> None:
    bp = backpressure([{}, {("down", 0): (400, 350)}])
    bp.sent = 400
    deliver(bp, range(400))
    assert bp.update() and bp.estimate() == 400  # nothing read yet: all 400 of ours count
    bp._next_check = 0.0
    assert not bp.update() and bp.estimate() == 50


def test_one_owner_pauses_for_priority_and_for_backpressure() -> None:
    consumer = Consumer()
    bp = backpressure([lagging(0), lagging(1_000), lagging(0)])
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
