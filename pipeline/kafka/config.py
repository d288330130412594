"""Kafka client configuration, in one place: librdkafka (confluent-kafka) producers and
consumers, and faust's aiokafka credentials; SASL/SSL from the settings."""

from __future__ import annotations

import logging
import ssl
from typing import Any

from pipeline.config import Settings

log = logging.getLogger(__name__)


def confluent_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    """Common librdkafka settings: bootstrap servers and SASL/SSL."""
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers(),
        "security.protocol": settings.security_protocol,
        # Small request/response records: without this, Nagle + delayed ACKs add ~40 ms.
        "socket.nagle.disable": True,
    }
    if settings.sasl_mechanism:
        config["sasl.mechanism"] = settings.sasl_mechanism
    if settings.sasl_username is not None:
        config["sasl.username"] = settings.sasl_username
    if settings.sasl_password is not None:
        config["sasl.password"] = settings.sasl_password
    if settings.ssl_cafile:
        config["ssl.ca.location"] = settings.ssl_cafile
    if settings.ssl_certfile:
        config["ssl.certificate.location"] = settings.ssl_certfile
    if settings.ssl_keyfile:
        config["ssl.key.location"] = settings.ssl_keyfile
    config.update(extra)
    return config


def producer_config(settings: Settings, **extra: Any) -> dict[str, Any]:
    return confluent_config(
        settings,
        **{
            "linger.ms": settings.producer_linger_ms,
            "compression.type": settings.compression_type,
            "enable.idempotence": True,
            "acks": "all",
            "message.max.bytes": settings.max_record_bytes,
            **extra,
        },
    )


def consumer_config(settings: Settings, group_id: str, **extra: Any) -> dict[str, Any]:
    return confluent_config(
        settings,
        **{
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": True,
            "fetch.wait.max.ms": settings.consumer_fetch_max_wait_ms,
            "fetch.min.bytes": settings.consumer_fetch_min_bytes,
            "fetch.message.max.bytes": max(settings.max_payload_bytes * 2, 1_048_576),
            # When the prefetch queue is full (queued.max.messages.kbytes, 64 MB: ~20k records
            # of 3 KB), librdkafka waits fetch.queue.backoff.ms, 1 s by default, before it
            # fetches again: a consumer with a backlog of large records then starves for most
            # of each second (seen: a ResNet worker idle in poll 21 % of its time).
            "fetch.queue.backoff.ms": 10,
            **extra,
        },
    )


def faust_credentials(settings: Settings) -> Any:
    """The faust ``broker_credentials`` for the configured security protocol, or None."""
    import faust

    context = None
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=settings.ssl_cafile)
        if settings.ssl_certfile:
            context.load_cert_chain(settings.ssl_certfile, settings.ssl_keyfile)
    if settings.security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.sasl_username,
            password=settings.sasl_password,
            ssl_context=context,
            mechanism=settings.sasl_mechanism,
        )
    if context is not None:
        return faust.SSLCredentials(context)
    return None
