"""Settings: defaults, reading ``SLUICE_*``, validation at the edge, and the bootstrap lookup."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from pipeline.config import ENV_PREFIX, Settings, SettingsError


def test_defaults(tmp_path: Path) -> None:
    s = Settings(cache_dir=tmp_path)
    assert s.bootstrap is None
    assert s.topic_prefix == "sluice"
    assert s.partitions == 4
    assert s.replication_factor == 0  # min(3, brokers)
    assert s.max_batch_size == 64
    assert s.max_delay_s == 0.002
    assert s.max_inflight == 4096
    assert s.max_payload_bytes == 1_048_576
    assert s.max_elements_per_tensor == 1_048_576
    assert s.default_ttl_ms == 0
    assert s.security_protocol == "PLAINTEXT"
    assert s.sasl_mechanism is None
    assert s.torch_threads == 1
    assert s.metrics_enabled is True
    assert s.lag_interval_s == 5.0
    assert s.gpu_interval_s == 5.0
    # Derived names.
    assert s.models_path == tmp_path / "models"
    assert s.requests_topic == "sluice.requests"
    assert s.results_topic == "sluice.results"
    assert s.responses_topic == "sluice.responses"
    assert s.dlq_topic == "sluice.dlq"
    assert s.infer_topic("demo") == "sluice.infer.demo"
    assert s.group_id("gateway") == "sluice-gateway"


def test_derived_names_follow_overrides(tmp_path: Path) -> None:
    s = Settings(
        cache_dir=tmp_path,
        topic_prefix="t-1.x",
        model_dir=tmp_path / "m",
        responses_topic_name="answers",
    )
    assert s.models_path == tmp_path / "m"
    assert s.responses_topic == "answers"
    assert s.dlq_topic == "t-1.x.dlq"


def test_settings_are_frozen() -> None:
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.max_batch_size = 2  # type: ignore[misc]


def test_secret_not_in_repr() -> None:
    s = Settings(security_protocol="SASL_SSL", sasl_mechanism="PLAIN", sasl_password="hunter2")
    assert "hunter2" not in repr(s)


def test_from_env_reads_prefixed_variables(tmp_path: Path) -> None:
    env = {
        "SLUICE_BOOTSTRAP": "kafka-1:9092,kafka-2:9092",
        "SLUICE_TOPIC_PREFIX": "prod",
        "SLUICE_PARTITIONS": "12",
        "SLUICE_MAX_BATCH_SIZE": "1_024",
        "SLUICE_MAX_INFLIGHT": "8192",
        "SLUICE_MAX_DELAY_S": "0.25",
        "SLUICE_CACHE_DIR": str(tmp_path / "cache"),
        "SLUICE_MODEL_DIR": str(tmp_path / "models"),
        "SLUICE_SECURITY_PROTOCOL": "SASL_SSL",
        "SLUICE_SASL_MECHANISM": "SCRAM-SHA-512",
        "SLUICE_DEFAULT_TTL_MS": "",  # empty means unset
        "MAX_BATCH_SIZE": "3",  # no prefix: ignored
        "SLUICE_NOT_A_FIELD": "x",  # unknown: ignored
    }
    s = Settings.from_env(env)
    assert s.bootstrap == "kafka-1:9092,kafka-2:9092"
    assert s.topic_prefix == "prod"
    assert s.partitions == 12 and isinstance(s.partitions, int)
    assert s.max_batch_size == 1024
    assert s.max_inflight == 8192
    assert s.max_delay_s == 0.25 and isinstance(s.max_delay_s, float)
    assert s.cache_dir == tmp_path / "cache" and isinstance(s.cache_dir, Path)
    assert s.model_dir == tmp_path / "models" and isinstance(s.model_dir, Path)
    assert s.models_path == tmp_path / "models"
    assert s.security_protocol == "SASL_SSL"
    assert s.sasl_mechanism == "SCRAM-SHA-512"
    assert s.default_ttl_ms == 0


def test_from_env_does_not_read_os_environ_when_given_a_mapping(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SLUICE_PARTITIONS", "7")
    assert Settings.from_env({}).partitions == 4
    assert Settings.from_env().partitions == 7


def test_from_env_overrides_win_and_none_is_ignored() -> None:
    s = Settings.from_env(
        {"SLUICE_PARTITIONS": "3", "SLUICE_TOPIC_PREFIX": "a"}, partitions=9, topic_prefix=None
    )
    assert s.partitions == 9
    assert s.topic_prefix == "a"


def test_from_env_expands_user_in_paths(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings.from_env({"SLUICE_MODEL_DIR": "~/models"})
    assert s.model_dir == tmp_path / "models"


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({"SLUICE_PARTITIONS": "abc"}, ["SLUICE_PARTITIONS", "'abc'"]),
        ({"SLUICE_MAX_BATCH_SIZE": "1.5"}, ["SLUICE_MAX_BATCH_SIZE", "'1.5'"]),
        ({"SLUICE_MAX_DELAY_S": "soon"}, ["SLUICE_MAX_DELAY_S", "'soon'"]),
        ({"SLUICE_MAX_BATCH_SIZE": "0"}, ["max_batch_size", "got 0"]),
        ({"SLUICE_PARTITIONS": "-2"}, ["partitions", "got -2"]),
        ({"SLUICE_MAX_DELAY_S": "-1"}, ["max_delay_s", "got -1.0"]),
        ({"SLUICE_MAX_DELAY_S": "nan"}, ["max_delay_s", "nan"]),
        ({"SLUICE_METRICS_PORT": "70000"}, ["metrics_port", "got 70000"]),
        ({"SLUICE_METRICS_ENABLED": "maybe"}, ["SLUICE_METRICS_ENABLED", "'maybe'"]),
        ({"SLUICE_LAG_INTERVAL_S": "0"}, ["lag_interval_s", "got 0.0"]),
        ({"SLUICE_LAG_INTERVAL_S": "often"}, ["SLUICE_LAG_INTERVAL_S", "'often'"]),
        ({"SLUICE_GPU_INTERVAL_S": "inf"}, ["gpu_interval_s", "got inf"]),
        ({"SLUICE_MAX_PAYLOAD_BYTES": "10"}, ["max_payload_bytes", "got 10"]),
        ({"SLUICE_TOPIC_PREFIX": "bad prefix!"}, ["topic_prefix", "'bad prefix!'"]),
        ({"SLUICE_SECURITY_PROTOCOL": "TLS"}, ["security_protocol", "'TLS'"]),
        ({"SLUICE_SECURITY_PROTOCOL": "SASL_SSL"}, ["sasl_mechanism", "SASL_SSL"]),
        (
            {"SLUICE_MAX_BATCH_SIZE": "128", "SLUICE_MAX_INFLIGHT": "64"},
            ["max_inflight", "128", "got 64"],
        ),
    ],
)
def test_from_env_rejects_bad_values_naming_them(env: dict[str, str], names: list[str]) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env(env)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 2.0}, "max_batch_size must be an integer >= 1, got 2.0"),
        ({"max_batch_size": True}, "max_batch_size must be an integer >= 1, got True"),
        ({"max_delay_s": -1}, "max_delay_s must be a number of seconds in [0, 60], got -1"),
        ({"max_delay_s": 61}, "max_delay_s must be a number of seconds in [0, 60], got 61"),
        ({"max_delay_s": "0.1"}, "got '0.1'"),
        ({"topic_prefix": ""}, "topic_prefix must be non-empty"),
        ({"topic_prefix": "a/b"}, "got 'a/b'"),
        ({"security_protocol": "SASL_PLAINTEXT"}, "sasl_mechanism is required"),
        ({"metrics_port": 65536}, "metrics_port must be an integer in [0, 65535], got 65536"),
        (
            {"lag_interval_s": 0.05},
            "lag_interval_s must be a number of seconds in [0.1, 3600], got 0.05",
        ),
        ({"lag_interval_s": True}, "lag_interval_s must be a number of seconds"),
        ({"gpu_interval_s": 3601}, "gpu_interval_s must be a number of seconds in [0.1, 3600]"),
        ({"metrics_enabled": "no"}, "metrics_enabled must be a bool, got 'no'"),
    ],
)
def test_constructor_validation_messages(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_settings_error_is_a_value_error() -> None:
    assert issubclass(SettingsError, ValueError)


def test_boundary_values_are_accepted() -> None:
    s = Settings(
        max_batch_size=1,
        max_inflight=1,
        max_delay_s=0,
        metrics_port=65535,
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
    )
    assert s.max_delay_s == 0
    assert Settings(max_delay_s=60).max_delay_s == 60


def test_to_env_round_trips_through_from_env(tmp_path: Path) -> None:
    original = Settings(
        bootstrap="b:1",
        topic_prefix="rt",
        partitions=3,
        cache_dir=tmp_path / "c",
        model_dir=tmp_path / "m",
        max_batch_size=8,
        max_delay_s=0.0125,
        max_inflight=100,
        default_ttl_ms=2500,
        responses_topic_name="rt.out",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username="u",
        sasl_password="p",
        log_level="DEBUG",
    )
    env = original.to_env()
    assert all(k.startswith(ENV_PREFIX) for k in env)
    assert all(isinstance(v, str) for v in env.values())
    assert env["SLUICE_MAX_DELAY_S"] == "0.0125"
    assert "SLUICE_SSL_CAFILE" not in env  # None is left out
    assert Settings.from_env(env) == original


def test_metrics_switch_from_env() -> None:
    for raw, enabled in (("false", False), ("0", False), ("no", False), ("True", True)):
        assert Settings.from_env({"SLUICE_METRICS_ENABLED": raw}).metrics_enabled is enabled
    off = Settings(metrics_enabled=False, lag_interval_s=0.5)
    assert Settings.from_env(off.to_env()) == off


def test_to_env_round_trips_defaults(tmp_path: Path) -> None:
    original = Settings(cache_dir=tmp_path)
    assert Settings.from_env(original.to_env()) == original


def test_replace_validates() -> None:
    s = Settings()
    assert s.replace(max_batch_size=2).max_batch_size == 2
    with pytest.raises(SettingsError, match="got 0"):
        s.replace(max_batch_size=0)


def test_bootstrap_servers_prefers_setting(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker" / "state.json").write_text(json.dumps({"port": 1234}))
    s = Settings(cache_dir=tmp_path, bootstrap="remote:9092")
    assert s.bootstrap_servers() == "remote:9092"


def test_bootstrap_servers_from_env_variable(tmp_path: Path) -> None:
    s = Settings.from_env({"SLUICE_BOOTSTRAP": "k:19092", "SLUICE_CACHE_DIR": str(tmp_path)})
    assert s.bootstrap_servers() == "k:19092"


def test_bootstrap_servers_reads_local_broker_state(tmp_path: Path) -> None:
    (tmp_path / "broker").mkdir()
    (tmp_path / "broker" / "state.json").write_text(json.dumps({"port": 41234, "pid": 1}))
    s = Settings.from_env({"SLUICE_CACHE_DIR": str(tmp_path)})
    assert s.bootstrap_servers() == "127.0.0.1:41234"


@pytest.mark.parametrize(
    "state", [None, "", "{not json", '{"pid": 1}', "null", "[]", '{"port": null}']
)
def test_bootstrap_servers_errors_clearly_without_a_cluster(
    tmp_path: Path, state: str | None
) -> None:
    if state is not None:
        (tmp_path / "broker").mkdir()
        (tmp_path / "broker" / "state.json").write_text(state)
    s = Settings(cache_dir=tmp_path)
    with pytest.raises(SettingsError) as info:
        s.bootstrap_servers()
    assert "SLUICE_BOOTSTRAP" in str(info.value)
    assert "sluice broker start" in str(info.value)


def test_reply_to_must_match_the_allowlist_and_never_name_the_pipelines_own_topics() -> None:
    s = Settings(topic_prefix="sl")
    for topic in ("sl.responses", "sl.replies", "sl.replies.client-7"):
        assert s.reply_to_allowed(topic), topic
    for topic in ("__consumer_offsets", "__transaction_state", "evil", "sl.dlq",
                  "sl.requests", "sl.infer.demo", "sl.results", "sl.features-changelog",
                  "client-7.replies", "other.replies.x", "sl.repliesx"):  # fmt: skip
        assert not s.reply_to_allowed(topic), topic
    wide = Settings(topic_prefix="sl", reply_to_topics="*")
    assert wide.reply_to_allowed("anything") and not wide.reply_to_allowed("sl.requests")
    none = Settings(topic_prefix="sl", reply_to_topics="")
    assert not none.reply_to_allowed("sl.replies") and none.reply_to_allowed("sl.responses")


def test_an_engine_refuses_what_it_cannot_do_naming_both_sides() -> None:
    with pytest.raises(SettingsError) as info:
        Settings(engine="faust", delivery="exactly_once")
    message = str(info.value)
    assert "SLUICE_ENGINE=faust" in message and "SLUICE_DELIVERY=exactly_once" in message
    assert "SLUICE_ENGINE=batch" in message
    assert Settings(engine="batch", delivery="exactly_once").delivery == "exactly_once"
    assert Settings.from_env({"SLUICE_ENGINE": "faust"}).engine == "faust"
