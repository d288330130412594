"""`_retrying`: the steps of a broker's warm-up, tried again while a cluster is joining."""

from __future__ import annotations

import time

import pytest
from confluent_kafka import KafkaError, KafkaException

from pipeline.ops.broker import _retrying


def failing(*codes: int) -> tuple[list[int], object]:
    """A step that raises each of ``codes`` in turn, then succeeds; and the calls made."""
    calls: list[int] = []

    def step() -> None:
        calls.append(len(calls))
        if len(calls) <= len(codes):
            raise KafkaException(KafkaError(codes[len(calls) - 1]))

    return calls, step


def test_a_coordinator_moving_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    # librdkafka reports these from `Consumer.committed` without marking them retriable.
    monkeypatch.setattr(time, "sleep", lambda s: None)
    codes = (
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError._TRANSPORT,
    )
    calls, step = failing(*codes)
    _retrying(step, time.monotonic() + 60)
    assert len(calls) == len(codes) + 1


def test_an_error_that_will_not_pass_is_raised_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls, step = failing(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException):
        _retrying(step, time.monotonic() + 60)
    assert len(calls) == 1


def test_a_done_anyway_error_ends_the_step(monkeypatch: pytest.MonkeyPatch) -> None:
    calls, step = failing(KafkaError.TOPIC_ALREADY_EXISTS)
    _retrying(step, time.monotonic() + 60, (KafkaError.TOPIC_ALREADY_EXISTS,))
    assert len(calls) == 1


def test_past_the_deadline_the_error_is_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda s: None)
    calls, step = failing(*[KafkaError.NOT_COORDINATOR] * 5)
    with pytest.raises(KafkaException):
        _retrying(step, time.monotonic() - 1)
    assert len(calls) == 1
