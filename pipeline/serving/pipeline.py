"""The pipeline's three stages as library calls: gateway, infer, respond.

Agents (``agents/``) and the batch engine feed records in; everything here is testable
without Kafka. Errors never escape as exceptions: a request that cannot be served ends as a
DLQ record with a reason and, where the requester can be answered, an ``error`` or
``expired`` response.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from pipeline.config import Settings
from pipeline.experiments.live import LiveExperiments
from pipeline.models import ModelRegistry
from pipeline.observability.metrics import Metrics
from pipeline.serving.publishing import Publishing
from pipeline.serving.records import Sink

if TYPE_CHECKING:
    from pipeline.features.store import FeatureStore
    from pipeline.serving.result_cache import ResultCache

log = logging.getLogger(__name__)


class Pipeline(Publishing):
    """Gateway, infer and respond logic shared by every engine and mode.

    The core is synchronous and returns the records to publish (`Publication`s); the async
    methods publish them through ``sink`` and ack each source record once everything
    published for it is delivered (the faust agents use those). The batch engine publishes
    the same records with its own producer.
    """

    def __init__(
        self, settings: Settings, registry: ModelRegistry, sink: Sink | None, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.sink = sink
        self.metrics = metrics
        # Models loaded from here on batch up to the settings' size unless their config says.
        registry.max_batch_size = settings.max_batch_size
        self._acks: set[asyncio.Task[None]] = set()
        self._children: dict[tuple[str, str, str, str], tuple[Any, Any]] = {}
        self._batch_children: dict[tuple[str, str, str], tuple[Any, Any, Any, Any]] = {}
        # Feature enrichment and the result cache (pipeline/features), when configured.
        self.features: FeatureStore | None = None
        self.results: ResultCache | None = None
        if settings.feature_source:
            from pipeline.features.store import FeatureStore

            self.features = FeatureStore.from_settings(settings, metrics).start()
        if settings.result_cache_enabled:
            from pipeline.serving.result_cache import ResultCache

            self.results = ResultCache.from_settings(settings, metrics)
        # Each model's experiment (its experiment.json), if it has one.
        self.experiments: LiveExperiments | None = LiveExperiments(
            settings, registry.model_dir, registry.versions, lambda: registry.names, metrics
        )

    def close(self) -> None:
        """Stop the preparation thread and the prefetcher; close the caches' stores."""
        self.close_preparation()
        if self.features is not None:
            self.features.close()
        if self.results is not None:
            self.results.close()
        if self.experiments is not None:
            self.experiments.close()
