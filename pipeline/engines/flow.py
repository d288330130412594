"""Lag-based backpressure: pause consuming while the next stage is too far behind.

In split mode each stage publishes to the next stage's topic. When the next stage's consumer
group lags (end offsets minus committed offsets, over its topics) by more than the high-water
mark, the upstream stage pauses its partitions, so that work waits in Kafka instead of
piling up downstream; it resumes once the lag falls below the low-water mark (hysteresis, no
flapping). In fused mode nothing is needed: the engine only consumes as fast as it answers.

The broker is asked at most once per interval, but the decision is taken on every loop: the
lag read then, plus what this process has produced downstream that the read could not have
seen (not yet delivered when it started). So the lag passes the high-water mark by at most
one consumed batch, however fast the stage forwards between two reads.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from pipeline.config import Settings
from pipeline.kafka import consumer_config, high_watermark

log = logging.getLogger(__name__)


class Backpressure:
    """Pauses and resumes an upstream consumer on the downstream group's offset lag."""

    def __init__(
        self, settings: Settings, group: str, topics: list[str], paused_gauge: Any = None
    ) -> None:
        self.high = settings.backpressure_high_water
        self.low = settings.backpressure_low_water
        self.interval_s = settings.backpressure_interval_s
        self.topics = topics
        self.paused = False
        self.paused_gauge = paused_gauge
        # A consumer with the downstream group's id that never joins it: it only reads the
        # group's committed offsets.
        self._probe = Consumer(consumer_config(settings, group, **{"enable.auto.commit": False}))
        self._partitions: list[TopicPartition] = []
        self._next_check = 0.0
        self.downstream = frozenset(topics)
        # Records this process produced to ``downstream``, and how many of them are
        # delivered; ``_lag`` is the last read plus those undelivered when it started.
        self.sent = 0
        self.delivered = 0
        self._read_lag = 0
        self._unseen_from = 0  # ``delivered`` when the last read started

    def lag(self) -> int:
        if not self._partitions:
            md = self._probe.list_topics(timeout=10).topics
            self._partitions = [
                TopicPartition(t, p) for t in self.topics if t in md for p in md[t].partitions
            ]
        committed = self._probe.committed(self._partitions, timeout=10)
        total = 0
        for tp in committed:
            end = high_watermark(self._probe, tp.topic, tp.partition)
            start = tp.offset if tp.offset >= 0 else 0
            total += max(0, end - start)
        return total

    def estimate(self) -> int:
        """The downstream lag now: the last read, plus what was produced since that the read
        could not count (everything not delivered when it started)."""
        return self._read_lag + self.sent - self._unseen_from

    def update(self, consumer: Consumer) -> None:
        """Read the downstream lag (at most once per interval); pause or resume on it."""
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + self.interval_s
            delivered = self.delivered
            try:
                self._read_lag = self.lag()
                self._unseen_from = delivered
            except Exception as exc:  # noqa: BLE001 - the last read stands until the broker answers
                log.warning("backpressure: cannot read downstream lag: %s", exc)
        lag = self.estimate()
        if not self.paused and lag > self.high:
            self.paused = True
            log.info("downstream lag %d > %d: pausing", lag, self.high)
        elif self.paused and lag < self.low:
            self.paused = False
            log.info("downstream lag %d < %d: resuming", lag, self.low)
        else:
            return
        self.apply(consumer)

    def apply(self, consumer: Consumer) -> None:
        """Bring the consumer's current assignment in line with the decision."""
        assignment = consumer.assignment()
        if not assignment:
            return
        if self.paused:
            consumer.pause(assignment)
        else:
            consumer.resume(assignment)
        if self.paused_gauge is not None:
            self.paused_gauge.set(len(assignment) if self.paused else 0)

    def close(self) -> None:
        self._probe.close()
