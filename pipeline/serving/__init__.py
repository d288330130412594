"""What happens to one request, engine-independent and without Kafka: records (`records`),
admission (`admission`), execution with retry and bisection (`execution`), responses and the
result cache (`responses`, `result_cache`), rejections (`rejections`) and async publishing
(`publishing`), composed by `pipeline.Pipeline`."""

from pipeline.serving.execution import is_transient
from pipeline.serving.pipeline import Pipeline
from pipeline.serving.records import (
    ORIGIN_HEADER,
    SESSION_HEADER,
    Deferred,
    Headers,
    Job,
    Origin,
    Outcome,
    Publication,
    Record,
    Running,
    Sink,
    now_ms,
)
from pipeline.serving.responses import postprocess

__all__ = [
    "ORIGIN_HEADER",
    "SESSION_HEADER",
    "Deferred",
    "Headers",
    "Job",
    "Origin",
    "Outcome",
    "Pipeline",
    "Publication",
    "Record",
    "Running",
    "Sink",
    "is_transient",
    "now_ms",
    "postprocess",
]
