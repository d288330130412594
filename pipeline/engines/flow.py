"""Flow control: what the engine's consumer reads, and what waits in Kafka.

Two reasons to wait, one owner of pause and resume (`FlowControl`):

- **Backpressure** (split mode): when the next stage's consumer group lags (end offsets
  minus committed offsets over its topics, counted as `pipeline.kafka.lag` does) by more than the
  high-water mark, the stage pauses all its partitions, so that work waits in Kafka instead of
  piling up downstream; it resumes below the low-water mark (hysteresis, no flapping). The
  broker is asked at most once per interval, but the decision is taken on every loop: the lag
  read then, plus what this process has produced downstream since. A read is put to use
  once every record produced before it started has its delivery report, whose offset says
  whether the read counted it: so each record counts once, the lag passes the high-water
  mark by at most one consumed batch however fast the stage forwards between two reads,
  and the stage does not pause below it.
- **Priority**: while the priority topic has a backlog, the stage's other partitions wait.
  This reads only librdkafka's cached high watermarks and positions (no broker round trip).

In fused mode there is no backpressure: the engine only consumes as fast as it answers.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import consumer_config
from pipeline.kafka.lag import consumed_from

log = logging.getLogger(__name__)


_READ_TIMEOUT_S = 1.0


class Backpressure:
    """Decides from the downstream group's offset lag whether the stage should wait."""

    def __init__(self, settings: Settings, group: str, topics: list[str]) -> None:
        self.settings = settings
        self.high = settings.backpressure_high_water
        self.low = settings.backpressure_low_water
        self.interval_s = settings.backpressure_interval_s
        self.group = group
        self.topics = topics
        self.downstream = frozenset(topics)
        self.paused = False
        self._probe: Any = None
        self._partitions: list[TopicPartition] = []
        self._next_check = 0.0
        # Records this process produced to ``downstream`` (`Publisher` counts them): ``sent``
        # before produce; of those, ``delivered`` are in the topic at a known offset and
        # ``gone`` never reached it (refused, or failed: produced again counts as sent again).
        self.sent = 0
        self.delivered = 0
        self.gone = 0
        self._ends: dict[tuple[str, int], int] = {}  # past our last delivered offset
        self._counts: dict[tuple[str, int], int] = {}  # delivered, per partition
        # The read in use: per partition, its end offset and where the group consumes from.
        self._read: dict[tuple[str, int], tuple[int, int]] = {}
        # A newer read, and ``sent`` when it started: it replaces the one in use once every
        # record sent before it started is settled, so that none of them is in doubt.
        self._pending: tuple[dict[tuple[str, int], tuple[int, int]], int] | None = None

    def report(self, err: Any, msg: Any) -> None:
        """The delivery report of a record produced downstream."""
        if err is not None:
            self.gone += 1
            return
        key = (msg.topic(), msg.partition())
        self.delivered += 1
        self._ends[key] = max(self._ends.get(key, 0), msg.offset() + 1)
        self._counts[key] = self._counts.get(key, 0) + 1

    def read(self) -> dict[tuple[str, int], tuple[int, int]]:
        """The downstream group's position now, read from the broker: per partition, its end
        offset and where the group consumes from (the committed offset, else the log
        start), through a consumer with the group's id that never joins it."""
        # Each broker call is bounded by _READ_TIMEOUT_S: the read runs on the engine's loop,
        # and one that takes longer (a coordinator not yet ready on a fresh broker, say)
        # raises, so the last read stands and the loop goes on consuming.
        if self._probe is None:
            self._probe = Consumer(
                consumer_config(self.settings, self.group, **{"enable.auto.commit": False})
            )
        if not self._partitions:  # until the topics' metadata has been read once
            md = self._probe.list_topics(timeout=_READ_TIMEOUT_S).topics
            self._partitions = [
                TopicPartition(t, p) for t in self.topics if t in md for p in md[t].partitions
            ]
        read = {}
        for tp in self._probe.committed(self._partitions, timeout=_READ_TIMEOUT_S):
            low, high = self._probe.get_watermark_offsets(tp, timeout=_READ_TIMEOUT_S)
            committed = tp.offset if tp.offset >= 0 else None
            read[(tp.topic, tp.partition)] = (high, consumed_from(committed, low))
        return read

    def close(self) -> None:
        if self._probe is not None:
            self._probe.close()

    def estimate(self) -> int:
        """The downstream lag now. The read in use started after every record still in
        flight was sent, so those count in full; each partition's end moves up to past the
        last record this process delivered there (whether the read saw it or not)."""
        lag = 0
        for key, (end, start) in self._read.items():
            lag += max(0, max(end, self._ends.get(key, 0)) - start)
        lag += sum(n for key, n in self._counts.items() if key not in self._read)
        return lag + self.sent - self.delivered - self.gone

    def update(self) -> bool:
        """Read the downstream lag (at most once per interval); returns whether to wait."""
        if self._pending is not None and self.delivered + self.gone >= self._pending[1]:
            self._read, self._pending = self._pending[0], None
        now = time.monotonic()
        if self._pending is None and now >= self._next_check:
            self._next_check = now + self.interval_s
            sent = self.sent
            try:
                self._pending = (self.read(), sent)
            except Exception as exc:  # noqa: BLE001 - the last read stands until the broker answers
                log.warning("backpressure: cannot read downstream lag: %s", exc)
            if self._pending is not None and self.delivered + self.gone >= sent:
                self._read, self._pending = self._pending[0], None
        lag = self.estimate()
        if not self.paused and lag > self.high:
            self.paused = True
            log.info("downstream lag %d > %d: pausing", lag, self.high)
        elif self.paused and lag < self.low:
            self.paused = False
            log.info("downstream lag %d < %d: resuming", lag, self.low)
        return self.paused


class FlowControl:
    """The one owner of the consumer's paused partitions, for backpressure and priority."""

    def __init__(
        self,
        consumer: Any,
        priority_topic: str | None,
        backpressure: Backpressure | None,
        paused_gauge: Any = None,
    ) -> None:
        self.consumer = consumer
        self.priority_topic = priority_topic  # None: this stage reads no requests
        self.backpressure = backpressure
        self.paused_gauge = paused_gauge
        # The assignment as the rebalance callbacks last gave it: Consumer.assignment() is a
        # round trip to librdkafka's group thread (~1 ms under load), too dear per batch.
        self.assignment: list[TopicPartition] = []
        self.paused: set[tuple[str, int]] = set()

    def assigned(self, partitions: list[TopicPartition]) -> None:
        """New partitions start unpaused: pause at once those the decision holds."""
        self.assignment = list(partitions)
        self.paused = set()
        self._apply(self._wanted(read_lag=False))

    def revoked(self) -> None:
        self.assignment = []
        self.paused = set()

    def update(self) -> None:
        """Decide, and pause or resume the partitions whose state changes."""
        self._apply(self._wanted(read_lag=True))

    def _wanted(self, read_lag: bool) -> set[tuple[str, int]]:
        bp = self.backpressure
        if bp is not None and (bp.update() if read_lag else bp.paused):
            return {(tp.topic, tp.partition) for tp in self.assignment}
        if self.priority_topic is not None and self._priority_backlog() > 0:
            return {
                (tp.topic, tp.partition)
                for tp in self.assignment
                if tp.topic != self.priority_topic
            }
        return set()

    def _priority_backlog(self) -> int:
        urgent = [tp for tp in self.assignment if tp.topic == self.priority_topic]
        backlog = 0
        if urgent:
            for tp in self.consumer.position(urgent):
                low, high = self.consumer.get_watermark_offsets(tp, cached=True)
                # Before the first record of a partition is consumed its position is unknown:
                # count from the low watermark until then.
                position = tp.offset if tp.offset >= 0 else low
                if high > position >= 0:
                    backlog += high - position
        return backlog

    def _apply(self, wanted: set[tuple[str, int]]) -> None:
        pause = wanted - self.paused
        resume = self.paused - wanted
        if pause:
            self.consumer.pause([TopicPartition(t, p) for t, p in pause])
        if resume:
            self.consumer.resume([TopicPartition(t, p) for t, p in resume])
        self.paused = wanted
        if self.paused_gauge is not None and (pause or resume):
            self.paused_gauge.set(len(wanted))
