"""The pipeline's shape: its modes and stages, what each stage consumes, and what comes
after it. Both engines read it from here.

    requests (+ priority) ─► gateway ─► infer.<model> ─► infer ─► results ─► respond ─► responses
    fused: gateway, infer and respond in one process, handed over in memory
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import StrEnum

from pipeline.config import Settings


class Mode(StrEnum):
    """How a worker runs the stages: all in one process (``fused``), one stage per process
    (``split``), or the one-request-at-a-time baseline (``naive``, faust only)."""

    FUSED = "fused"
    SPLIT = "split"
    NAIVE = "naive"


class Stage(StrEnum):
    """What one worker process runs: the fused pipeline, or one stage of the split one."""

    FUSED = "fused"
    GATEWAY = "gateway"
    INFER = "infer"
    RESPOND = "respond"

    @classmethod
    def of(cls, mode: str, stage: str | None = None) -> Stage:
        """The stage a worker of ``mode`` runs (split mode names one of its three)."""
        if Mode(mode) != Mode.SPLIT:
            return cls.FUSED
        split = (cls.GATEWAY, cls.INFER, cls.RESPOND)
        if stage not in split:
            raise ValueError(
                f"split mode needs a stage in {[s.value for s in split]}, got {stage!r}"
            )
        return cls(stage)

    @property
    def admits(self) -> bool:
        """Whether this stage reads requests (and so serves the priority topic first)."""
        return self in (Stage.FUSED, Stage.GATEWAY)

    @property
    def computes(self) -> bool:
        """Whether this stage runs models (and so batches onto the device)."""
        return self in (Stage.FUSED, Stage.INFER)


def consumed_topics(settings: Settings, stage: Stage, models: Sequence[str]) -> list[str]:
    """The topics a worker of ``stage`` consumes."""
    if stage.admits:
        return [settings.priority_topic, settings.requests_topic]
    if stage == Stage.INFER:
        return [settings.infer_topic(m) for m in models]
    return [settings.results_topic]


def downstream(
    settings: Settings, stage: Stage, models: Sequence[str]
) -> tuple[str, list[str]] | None:
    """The consumer group and topics of the stage after ``stage`` (split mode), if any."""
    if stage == Stage.GATEWAY:
        return settings.group_id(Stage.INFER), [settings.infer_topic(m) for m in models]
    if stage == Stage.INFER:
        return settings.group_id(Stage.RESPOND), [settings.results_topic]
    return None
