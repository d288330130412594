"""The root of sluice's exceptions: every error sluice raises on purpose is a `SluiceError`,
so one ``except SluiceError`` catches them all. Each module's errors live beside it:

- `pipeline.config.SettingsError`: a setting sluice cannot use;
- `pipeline.protocol.codec.RequestError`: a request that cannot be served (its reason code);
- `pipeline.models.ModelLoadError`: a model entry that cannot be loaded;
- `pipeline.kafka.produce.RecordRejected`: a record Kafka refuses for itself;
- `pipeline.client.TopicMissingError`: no worker has created the topic a client reads;
- `pipeline.ops.broker.BrokerError`: the local broker did not start or stop.
"""

from __future__ import annotations


class SluiceError(Exception):
    """Base class of the errors sluice raises."""
