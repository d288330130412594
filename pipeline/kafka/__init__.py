"""Kafka, as every part of sluice uses it: client configuration (`config`), producing with
retries (`produce`), topics (`topics`), readers (`readers`) and lag (`lag`)."""

from pipeline.kafka.config import (
    confluent_config,
    consumer_config,
    faust_credentials,
    producer_config,
)
from pipeline.kafka.produce import RecordRejected, produce, record_error
from pipeline.kafka.readers import consume_batch, high_watermark, topic_reader
from pipeline.kafka.topics import delete_topics, ensure_topics, pipeline_topics

__all__ = [
    "RecordRejected",
    "confluent_config",
    "consume_batch",
    "consumer_config",
    "delete_topics",
    "ensure_topics",
    "faust_credentials",
    "high_watermark",
    "pipeline_topics",
    "produce",
    "producer_config",
    "record_error",
    "topic_reader",
]
