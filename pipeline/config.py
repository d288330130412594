"""One frozen settings object, read from ``SLUICE_*`` environment variables in one place."""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pipeline.errors import SluiceError

ENV_PREFIX = "SLUICE_"


class Engine(StrEnum):
    """What drives the stages: confluent-kafka a batch at a time (fast), or faust agents an
    event at a time."""

    BATCH = "batch"
    FAUST = "faust"


class Delivery(StrEnum):
    AT_LEAST_ONCE = "at_least_once"
    EXACTLY_ONCE = "exactly_once"


class BatchWindow(StrEnum):
    """How long a batch waits to fill: ``adaptive``, only while its model is busy with the
    batch before (an idle model takes what has come at once); ``fixed``, ``max_delay_s``
    from its first request whatever the model is doing."""

    ADAPTIVE = "adaptive"
    FIXED = "fixed"


class Compression(StrEnum):
    NONE = "none"
    LZ4 = "lz4"
    ZSTD = "zstd"
    SNAPPY = "snappy"
    GZIP = "gzip"


class SettingsError(SluiceError, ValueError):
    """A setting has a value that sluice cannot use."""


def default_cache_dir() -> Path:
    """Where the Kafka runtime, the local broker's state and the demo models live."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "sluice"


@dataclass(frozen=True)
class Settings:
    """Everything a sluice process can be told, validated at construction.

    Durations and sizes carry their unit in their names.
    """

    bootstrap: str | None = None
    topic_prefix: str = "sluice"
    partitions: int = 4
    replication_factor: int = 0  # the topics sluice creates; 0: min(3, brokers)
    cache_dir: Path = field(default_factory=default_cache_dir)
    model_dir: Path | None = None
    max_batch_size: int = 64
    max_delay_s: float = 0.002
    batch_window: str = "adaptive"
    max_inflight: int = 4096
    max_payload_bytes: int = 1_048_576
    max_elements_per_tensor: int = 1_048_576
    default_ttl_ms: int = 0
    responses_topic_name: str | None = None
    # Where a request's `reply_to` may send its answer, besides the responses topic:
    # comma-separated fnmatch patterns; unset, ``<prefix>.replies`` and ``<prefix>.replies.*``.
    # The pipeline's other topics are refused whatever they match.
    reply_to_topics: str | None = None
    # A request record's envelope: its key, and its headers (count and bytes together).
    max_key_bytes: int = 16_384
    max_headers: int = 64
    max_header_bytes: int = 65_536
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0
    # False: the pipeline records into no-op metrics and serves nothing (to measure their cost).
    metrics_enabled: bool = True
    lag_interval_s: float = 5.0
    gpu_interval_s: float = 5.0
    producer_linger_ms: int = 1
    compression_type: str = "lz4"
    consumer_fetch_max_wait_ms: int = 10
    consumer_fetch_min_bytes: int = 1
    session_timeout_ms: int = 10_000
    # Stopping (SIGTERM): the answers already computed get up to drain_timeout_s to be
    # delivered; the whole shutdown is bounded by shutdown_timeout_s, after which the process
    # exits anyway (what it had not committed is consumed again). Kubernetes' grace period must
    # be longer (deploy/). The liveness probe fails once the loop is still for stall_timeout_s;
    # with exit_on_stall the worker exits then by itself (status 75), for supervisors that
    # restart a process but probe nothing.
    drain_timeout_s: float = 20.0
    shutdown_timeout_s: float = 30.0
    stall_timeout_s: float = 60.0
    exit_on_stall: bool = False
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    torch_threads: int = 1
    engine: str = "batch"
    # at_least_once: offsets stored after delivery (duplicates possible after a crash);
    # exactly_once: each batch's records and offsets in one Kafka transaction.
    delivery: str = "at_least_once"
    # This worker's slot in its group: distinct per process (the transactional id in
    # exactly-once mode), the same across restarts of that process.
    worker_id: str = "0"
    transaction_interval_ms: int = 100
    # Split mode: pause consuming while the next stage's lag exceeds the high-water mark,
    # resume below the low-water mark.
    backpressure_high_water: int = 20_000
    backpressure_low_water: int = 5_000
    backpressure_interval_s: float = 0.5
    # Transient model errors (out of memory) are retried with exponential backoff + jitter.
    max_attempts: int = 3
    retry_backoff_ms: int = 20
    log_level: str = "WARNING"
    # Features (pipeline/features): the cold source (files:///dir or redis://host:port/db), off
    # when unset; L1 memory and L2 RocksDB table bounds and TTLs (0: no expiry, no L2).
    feature_source: str | None = None
    feature_l1_max_bytes: int = 64 << 20
    feature_l1_ttl_s: float = 300.0
    feature_l2_path: Path | None = None
    feature_l2_max_bytes: int = 1 << 30
    feature_l2_ttl_s: float = 3600.0
    # Cache-penetration guards: Bloom filter of existing keys (capacity 0: none), negative TTL.
    bloom_capacity: int = 1_000_000
    bloom_fp_rate: float = 0.01
    # Rebuilt from the source this often, so keys added to it become visible (0: never).
    bloom_refresh_s: float = 300.0
    negative_ttl_s: float = 5.0
    negative_max_entries: int = 100_000
    # Predictive prefetch (pipeline/features/prefetch.py).
    prefetch_enabled: bool = True
    prefetch_budget_per_s: float = 1000.0
    prefetch_concurrency: int = 4
    prefetch_queue_size: int = 1024
    prefetch_depth: int = 2
    # Successors remembered per key, and the least share of a key's transitions that one
    # must hold to be prefetched (many rarely-taken successors: the end of a route).
    prefetch_fanout: int = 16
    prefetch_min_share: float = 0.02
    prefetch_max_keys: int = 100_000
    prefetch_hot_keys: int = 64
    # The result cache (pipeline/serving/result_cache.py): outputs by (model, version, inputs).
    result_cache_enabled: bool = False
    result_cache_ttl_s: float = 60.0
    result_cache_l1_max_bytes: int = 16 << 20
    result_cache_l2_max_bytes: int = 256 << 20
    # The infer path (pipeline/batching/, pipeline/models/runtime.py): batches submitted to the
    # device before the oldest is collected, and whether every model loads at start (else
    # on its first request).
    max_batches_in_flight: int = 2
    preload_models: bool = False
    # Experiments (pipeline/experiments): how often each model's experiment.json is checked
    # for changes, and the rollback guard's checks.
    experiment_reload_s: float = 2.0

    def __post_init__(self) -> None:
        self._check_caches()
        _require_int(self, "partitions", minimum=1)
        _require_int(self, "replication_factor", minimum=0)
        _require_int(self, "max_batch_size", minimum=1)
        _require_int(self, "max_inflight", minimum=1)
        _require_int(self, "max_payload_bytes", minimum=64)
        for name in ("max_key_bytes", "max_headers", "max_header_bytes"):
            _require_int(self, name, minimum=0)
        _require_int(self, "max_elements_per_tensor", minimum=1)
        _require_int(self, "default_ttl_ms", minimum=0)
        _require_int(self, "metrics_port", minimum=0, maximum=65535)
        _require_int(self, "producer_linger_ms", minimum=0)
        _require_int(self, "consumer_fetch_max_wait_ms", minimum=0)
        _require_int(self, "consumer_fetch_min_bytes", minimum=1)
        _require_int(self, "session_timeout_ms", minimum=1000)
        _require_int(self, "torch_threads", minimum=1)
        if not isinstance(self.max_delay_s, (int, float)) or not 0 <= self.max_delay_s <= 60:
            raise SettingsError(
                f"max_delay_s must be a number of seconds in [0, 60], got {self.max_delay_s!r}"
            )
        for name in (
            "lag_interval_s",
            "gpu_interval_s",
            "drain_timeout_s",
            "shutdown_timeout_s",
            "stall_timeout_s",
            "experiment_reload_s",
        ):
            value = getattr(self, name)
            if (
                not isinstance(value, (int, float))
                or isinstance(value, bool)
                or not 0.1 <= value <= 3600
            ):
                raise SettingsError(
                    f"{name} must be a number of seconds in [0.1, 3600], got {value!r}"
                )
        if self.shutdown_timeout_s <= self.drain_timeout_s:
            raise SettingsError(
                f"shutdown_timeout_s must be > drain_timeout_s ({self.drain_timeout_s}), "
                f"got {self.shutdown_timeout_s}"
            )
        if not isinstance(self.metrics_enabled, bool):
            raise SettingsError(f"metrics_enabled must be a bool, got {self.metrics_enabled!r}")
        if self.max_inflight < self.max_batch_size:
            raise SettingsError(
                f"max_inflight must be >= max_batch_size ({self.max_batch_size}), "
                f"got {self.max_inflight}"
            )
        if not self.topic_prefix or any(c not in _TOPIC_CHARS for c in self.topic_prefix):
            raise SettingsError(
                f"topic_prefix must be non-empty and use only [a-zA-Z0-9._-], "
                f"got {self.topic_prefix!r}"
            )
        _require_choice(self, "compression_type", Compression)
        _require_choice(self, "delivery", Delivery)
        _require_choice(self, "batch_window", BatchWindow)
        _require_int(self, "backpressure_low_water", minimum=0)
        _require_int(self, "backpressure_high_water", minimum=1)
        if self.backpressure_low_water >= self.backpressure_high_water:
            raise SettingsError(
                f"backpressure_low_water must be < backpressure_high_water "
                f"({self.backpressure_high_water}), got {self.backpressure_low_water}"
            )
        if not isinstance(self.backpressure_interval_s, (int, float)) or not (
            0.01 <= self.backpressure_interval_s <= 60
        ):
            raise SettingsError(
                "backpressure_interval_s must be a number of seconds in [0.01, 60], "
                f"got {self.backpressure_interval_s!r}"
            )
        _require_int(self, "max_attempts", minimum=1, maximum=100)
        _require_int(self, "max_batches_in_flight", minimum=1, maximum=16)
        if not isinstance(self.preload_models, bool):
            raise SettingsError(f"preload_models must be a bool, got {self.preload_models!r}")
        _require_int(self, "transaction_interval_ms", minimum=1)
        _require_int(self, "retry_backoff_ms", minimum=0)
        _require_choice(self, "engine", Engine)
        protocols = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
        if self.security_protocol not in protocols:
            raise SettingsError(
                f"security_protocol must be one of {protocols}, got {self.security_protocol!r}"
            )
        if self.security_protocol.startswith("SASL") and not self.sasl_mechanism:
            raise SettingsError(
                f"sasl_mechanism is required with security_protocol={self.security_protocol}"
            )
        # What the engine cannot do is refused here, never silently ignored.
        from pipeline.engines import capabilities

        capabilities.check(self)

    def _check_caches(self) -> None:
        if self.feature_source is not None:
            scheme = self.feature_source.split("://", 1)[0]
            if "://" not in self.feature_source or scheme not in ("files", "redis"):
                raise SettingsError(
                    "feature_source must be a files:///dir or redis://host:port/db URL, "
                    f"got {self.feature_source!r}"
                )
        for name in ("feature_l1_max_bytes", "result_cache_l1_max_bytes"):
            _require_int(self, name, minimum=1)
        for name in ("feature_l2_max_bytes", "result_cache_l2_max_bytes", "bloom_capacity"):
            _require_int(self, name, minimum=0)
        _require_int(self, "negative_max_entries", minimum=1)
        _require_int(self, "prefetch_concurrency", minimum=1, maximum=256)
        _require_int(self, "prefetch_queue_size", minimum=1)
        _require_int(self, "prefetch_depth", minimum=1, maximum=16)
        _require_int(self, "prefetch_fanout", minimum=1, maximum=256)
        _require_int(self, "prefetch_max_keys", minimum=1)
        _require_int(self, "prefetch_hot_keys", minimum=0)
        ttls = (
            "feature_l1_ttl_s", "feature_l2_ttl_s", "negative_ttl_s", "result_cache_ttl_s",
            "bloom_refresh_s",
        )  # fmt: skip
        for name in ttls:
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise SettingsError(f"{name} must be a number of seconds >= 0, got {value!r}")
        fp = self.bloom_fp_rate
        if not isinstance(fp, (int, float)) or isinstance(fp, bool) or not 0 < fp < 1:
            raise SettingsError(f"bloom_fp_rate must be a number in (0, 1), got {fp!r}")
        budget = self.prefetch_budget_per_s
        if not isinstance(budget, (int, float)) or isinstance(budget, bool) or not budget > 0:
            raise SettingsError(f"prefetch_budget_per_s must be a number > 0, got {budget!r}")
        share = self.prefetch_min_share
        if not isinstance(share, (int, float)) or isinstance(share, bool) or not 0 < share <= 1:
            raise SettingsError(f"prefetch_min_share must be a number in (0, 1], got {share!r}")

    @property
    def features_changelog_topic(self) -> str:
        """The compacted changelog of the L2 feature table, partitioned like requests."""
        return f"{self.topic_prefix}.features-changelog"

    @property
    def l2_tables_path(self) -> Path:
        """This worker's L2 RocksDB stores (distinct per worker slot: RocksDB locks them)."""
        if self.feature_l2_path is not None:
            return self.feature_l2_path
        return self.cache_dir / "tables" / f"{self.topic_prefix}-{self.worker_id}"

    # -- derived names ---------------------------------------------------------

    @property
    def models_path(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.cache_dir / "models"

    @property
    def reply_to_patterns(self) -> list[str]:
        if self.reply_to_topics is None:
            return [f"{self.topic_prefix}.replies", f"{self.topic_prefix}.replies.*"]
        return [p.strip() for p in self.reply_to_topics.split(",") if p.strip()]

    def reply_to_allowed(self, topic: str) -> bool:
        """Whether a request may name ``topic`` as its ``reply_to``: the responses topic, or
        one the allowlist matches that is none of the pipeline's other topics."""
        if topic == self.responses_topic:
            return True
        own = (self.requests_topic, self.priority_topic, self.results_topic, self.dlq_topic,
               self.features_changelog_topic, self.shadow_topic,
               self.experiment_events_topic)  # fmt: skip
        if topic in own or topic.startswith(self.infer_topic("")):
            return False
        return any(fnmatch.fnmatchcase(topic, p) for p in self.reply_to_patterns)

    @property
    def max_record_bytes(self) -> int:
        """The largest record sluice produces (the producers' ``message.max.bytes``): room
        for an answer, and for a DLQ record that carries a whole request of the payload
        limit in base64."""
        return max(self.max_payload_bytes * 2, 1_048_576)

    @property
    def requests_topic(self) -> str:
        return f"{self.topic_prefix}.requests"

    @property
    def priority_topic(self) -> str:
        """Requests here are served before those on the requests topic."""
        return f"{self.topic_prefix}.requests.priority"

    @property
    def results_topic(self) -> str:
        return f"{self.topic_prefix}.results"

    @property
    def responses_topic(self) -> str:
        return self.responses_topic_name or f"{self.topic_prefix}.responses"

    @property
    def dlq_topic(self) -> str:
        return f"{self.topic_prefix}.dlq"

    @property
    def shadow_topic(self) -> str:
        """Mirrored requests' outputs, the primary's beside the shadow's (experiments)."""
        return f"{self.topic_prefix}.shadow"

    @property
    def experiment_events_topic(self) -> str:
        """Experiment events, such as a canary's rollback, keyed by model."""
        return f"{self.topic_prefix}.experiments"

    def infer_topic(self, model: str) -> str:
        return f"{self.topic_prefix}.infer.{model}"

    def group_id(self, stage: str) -> str:
        return f"{self.topic_prefix}-{stage}"

    def bootstrap_servers(self) -> str:
        """The cluster to talk to: ``SLUICE_BOOTSTRAP``, else the local broker's recorded port."""
        if self.bootstrap:
            return self.bootstrap
        state = self.cache_dir / "broker" / "state.json"
        try:
            port = json.loads(state.read_text())["port"]
        except (OSError, ValueError, KeyError, TypeError):
            port = None
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
            raise SettingsError(
                "no Kafka cluster: set SLUICE_BOOTSTRAP, or run `sluice broker start`"
            )
        return f"127.0.0.1:{port}"

    def to_env(self) -> dict[str, str]:
        """These settings as ``SLUICE_*`` variables, to hand to a child process."""
        env = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                env[ENV_PREFIX + f.name.upper()] = str(value)
        return env

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, /, **overrides: Any) -> Settings:
        """Read every field from ``SLUICE_<FIELD>``; ``overrides`` win over the environment."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw, _FIELD_TYPES[f.name])
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


_TOPIC_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _field_types() -> dict[str, type]:
    types: dict[str, type] = {}
    for f in dataclasses.fields(Settings):
        annotation = str(f.type)
        if annotation.startswith("int"):
            types[f.name] = int
        elif annotation.startswith("float"):
            types[f.name] = float
        elif annotation.startswith("Path"):
            types[f.name] = Path
        elif annotation.startswith("bool"):
            types[f.name] = bool
        else:
            types[f.name] = str
    return types


_FIELD_TYPES = _field_types()


def _parse(name: str, raw: str, kind: type) -> Any:
    env = ENV_PREFIX + name.upper()
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return lowered in ("1", "true", "yes")
        if kind is int:
            return int(raw.replace("_", ""))
        if kind is float:
            return float(raw)
        if kind is Path:
            return Path(raw).expanduser()
        return raw
    except ValueError:
        raise SettingsError(f"{env} must be {kind.__name__}, got {raw!r}") from None


def _require_choice(settings: Settings, name: str, choices: type[StrEnum]) -> None:
    """Check ``name`` against a closed set and store it as the enum's member."""
    value = getattr(settings, name)
    try:
        member = choices(value)
    except ValueError:
        raise SettingsError(
            f"{name} must be one of {[c.value for c in choices]}, got {value!r}"
        ) from None
    object.__setattr__(settings, name, member)


def _require_int(settings: Settings, name: str, minimum: int, maximum: int | None = None) -> None:
    value = getattr(settings, name)
    bounds = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        raise SettingsError(f"{name} must be an integer {bounds}, got {value!r}")
