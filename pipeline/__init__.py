"""sluice: event-driven streaming inference on Kafka.

What users import comes from here; everything else is internal. Names load on first use, so
that ``import pipeline`` stays cheap (a client does not pull in torch).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.client import AsyncClient, Client, TopicMissingError
    from pipeline.config import Settings, SettingsError
    from pipeline.errors import SluiceError
    from pipeline.kafka.produce import RecordRejected
    from pipeline.models import Handler, ModelLoadError
    from pipeline.protocol.codec import Request, RequestError, Response, Tensor

_EXPORTS = {
    "AsyncClient": "pipeline.client",
    "Client": "pipeline.client",
    "Handler": "pipeline.models",
    "ModelLoadError": "pipeline.models",
    "RecordRejected": "pipeline.kafka.produce",
    "Request": "pipeline.protocol.codec",
    "RequestError": "pipeline.protocol.codec",
    "Response": "pipeline.protocol.codec",
    "Settings": "pipeline.config",
    "SettingsError": "pipeline.config",
    "SluiceError": "pipeline.errors",
    "Tensor": "pipeline.protocol.codec",
    "TopicMissingError": "pipeline.client",
}

__all__ = [
    "AsyncClient",
    "Client",
    "Handler",
    "ModelLoadError",
    "RecordRejected",
    "Request",
    "RequestError",
    "Response",
    "Settings",
    "SettingsError",
    "SluiceError",
    "Tensor",
    "TopicMissingError",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
