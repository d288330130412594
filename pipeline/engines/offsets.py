"""At-least-once delivery: a consumed batch's offsets are stored only once everything
published for it, and for every batch consumed before it, is delivered.

The loop says "consumed" (`OffsetTracker.open`), counts each record it produces against the
batch (``outstanding``) and each request still in the batcher or on the device (``held``),
and calls `OffsetTracker.settle` on every turn: that is the one place offsets move forward.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException, TopicPartition

Offsets = dict[tuple[str, int], int]


class ConsumedBatch:
    """Deliveries outstanding for one consumed batch, and the last offset it covers per
    partition.

    ``held`` counts its requests still in the batcher or on the device (not answered yet),
    and its records whose delivery failed and that wait to be produced again or replaced.
    """

    __slots__ = ("offsets", "outstanding", "held")

    def __init__(self, offsets: Offsets) -> None:
        self.offsets = offsets
        self.outstanding = 0
        self.held = 0

    @property
    def settled(self) -> bool:
        return self.outstanding == 0 and self.held == 0


class OffsetTracker:
    """Stores a batch's offsets once it and every earlier batch are settled."""

    def __init__(self, consumer: Any) -> None:
        self.consumer = consumer
        self.pending: deque[ConsumedBatch] = deque()

    def open(self, offsets: Offsets) -> ConsumedBatch:
        """A batch for what was consumed up to ``offsets`` (the last offset of each
        partition, `origins_of`), settled after every batch opened before."""
        batch = ConsumedBatch(offsets)
        self.pending.append(batch)
        return batch

    def settle(self, store: Callable[[Offsets], None] | None = None) -> None:
        """Store the offsets of the settled prefix in the consumer (or hand them to
        ``store``: exactly-once sends them with the transaction instead)."""
        while self.pending and self.pending[0].settled:
            batch = self.pending.popleft()
            if store is not None:
                store(batch.offsets)
                continue
            try:
                self.consumer.store_offsets(
                    offsets=[TopicPartition(t, p, o + 1) for (t, p), o in batch.offsets.items()]
                )
            except KafkaException as exc:
                # A partition revoked meanwhile (a rebalance): its offsets cannot be stored,
                # and its next owner consumes from the committed offset (at-least-once).
                if exc.args[0].code() != KafkaError._STATE:
                    raise
