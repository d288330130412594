"""compose/ is consistent with itself and with the code: services, mounts, ports, Prometheus
scrape targets and alert rules, Grafana provisioning, and the metric names that the alert
rules and the dashboard query (every one must be exported by ``pipeline.observability.metrics``).

No Docker needed: the files are parsed, not run. ``promtool`` (Debian package
``prometheus``, installed by ``make sysdeps``) also checks the rules, their unit tests
(``compose/prometheus/alerts_test.yml``), the Prometheus config and every dashboard query.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from pipeline.cli import main as cli_main
from pipeline.config import ENV_PREFIX, Settings
from pipeline.observability.metrics import Metrics
from pipeline.observability.web import MetricsServer

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "compose"
COMPOSE_FILE = COMPOSE / "docker-compose.yml"
PROMETHEUS_DIR = COMPOSE / "prometheus"
GRAFANA_DIR = COMPOSE / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "pipeline-overview.json"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))

SPLIT_STAGES = ("gateway", "infer", "respond")
WORKERS = ("sluice-fused",) + tuple(f"sluice-{stage}" for stage in SPLIT_STAGES)
EXPECTED_SERVICES = {"kafka", "model-init", "prometheus", "grafana", *WORKERS}
METRICS_PORT = 9400

# Metrics the alert rules may use before pipeline/observability/metrics.py defines them
# (alerts.yml must say so in a comment). None at present.
PENDING_METRICS: set[str] = set()


# -- helpers ----------------------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    with path.open() as f:
        return yaml.safe_load(f)


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def _interpolate(value: Any) -> str:
    """A compose value with ``${VAR:-default}`` replaced by its default (the shell is ignored)."""
    text = str(value)

    def sub(m: re.Match[str]) -> str:
        op = m.group("op") or ""
        if "?" in op:
            raise AssertionError(f"{m.group(0)} makes the variable mandatory; give a default")
        return m.group("arg") or ""

    return _VAR.sub(sub, text).replace("$$", "$")


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): _interpolate(v) for k, v in env.items()}


def _depends_on(service: dict[str, Any]) -> dict[str, dict[str, Any]]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: {} for name in deps}
    return {name: (spec or {}) for name, spec in deps.items()}


def _volumes(service: dict[str, Any]) -> list[dict[str, Any]]:
    """Every mount of a service in long form: type, source, target, read_only."""
    mounts = []
    for v in service.get("volumes") or []:
        if isinstance(v, dict):
            mounts.append({
                "type": v.get("type", "volume"), "source": v.get("source"),
                "target": v["target"], "read_only": bool(v.get("read_only")),
            })  # fmt: skip
            continue
        parts = _interpolate(v).split(":")
        assert len(parts) in (2, 3), f"unexpected volume syntax {v!r}"
        source, target = parts[0], parts[1]
        kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        read_only = len(parts) == 3 and "ro" in parts[2].split(",")
        mounts.append({"type": kind, "source": source, "target": target, "read_only": read_only})
    return mounts


def _ports(service: dict[str, Any]) -> list[dict[str, str]]:
    """Every published port in long form: host_ip, published, target."""
    ports = []
    for p in service.get("ports") or []:
        if isinstance(p, dict):
            ports.append({"host_ip": str(p.get("host_ip", "")),
                          "published": str(p.get("published", "")),
                          "target": str(p["target"])})  # fmt: skip
            continue
        text = _interpolate(p).split("/")[0]
        parts = text.rsplit(":", 2)
        if len(parts) == 3:
            ports.append({"host_ip": parts[0], "published": parts[1], "target": parts[2]})
        elif len(parts) == 2:
            ports.append({"host_ip": "", "published": parts[0], "target": parts[1]})
        else:
            ports.append({"host_ip": "", "published": "", "target": parts[0]})
    return ports


def _listeners(value: str) -> dict[str, tuple[str, int]]:
    """``NAME://host:port,...`` as ``{NAME: (host, port)}``."""
    out = {}
    for item in value.split(","):
        name, address = item.strip().split("://", 1)
        host, port = address.rsplit(":", 1)
        out[name] = (host, int(port))
    return out


def _exported_series() -> set[str]:
    """Every series name our metrics export, with the suffixes Prometheus sees."""
    registry = CollectorRegistry()
    Metrics(registry)
    return _series_names(registry.collect())


def _served_series() -> set[str]:
    """Every series name a worker's /metrics endpoint (pipeline.observability.web) exposes."""
    server = MetricsServer(Metrics(CollectorRegistry()).registry).start()
    try:
        with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
            text = response.read().decode()
    finally:
        server.stop()
    return _series_names(text_string_to_metric_families(text))


def _series_names(families: Any) -> set[str]:
    names: set[str] = set()
    for family in families:
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        elif family.type == "summary":
            names |= {family.name + s for s in ("", "_sum", "_count", "_created")}
        elif family.type == "gauge":
            names.add(family.name)
        else:
            raise AssertionError(f"metric {family.name}: unhandled type {family.type}")
    return names


def _metric_label_names() -> set[str]:
    labels: set[str] = set()
    for metric in vars(Metrics(CollectorRegistry())).values():
        labels |= set(getattr(metric, "_labelnames", ()))
    return labels


_PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "inf", "nan",
}  # fmt: skip


def _promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (with Grafana variables) selects."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"'(?:[^'\\]|\\.)*'", "''", s)
    s = re.sub(r"\$\{[^}]*\}|\$\w+", "", s)  # Grafana variables
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)
    names = set()
    for m in re.finditer(r"(?<![\w.:])[A-Za-z_:][A-Za-z0-9_:]*", s):
        token = m.group(0)
        if s[m.end() :].lstrip().startswith("("):  # a function call
            continue
        if token.lower() in _PROMQL_WORDS:
            continue
        names.add(token)
    return names


def test_promql_metric_names_helper() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (le, model) (rate(sluice_a_bucket{model=~"$model",'
        ' stage="x_y"}[$__rate_interval]))) / on(gpu) group_left sluice_b offset 5m > 1e3'
    )
    assert _promql_metric_names(expr) == {"sluice_a_bucket", "sluice_b"}
    assert _promql_metric_names("max by (group, topic) (sluice_consumer_lag) > 100") == {
        "sluice_consumer_lag"
    }


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict) and isinstance(data.get("services"), dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return compose["services"]


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return _exported_series()


@pytest.fixture(scope="module")
def served() -> set[str]:
    return _served_series()


def test_metrics_endpoint_serves_every_defined_metric(served: set[str]) -> None:
    assert served == _exported_series()


@pytest.fixture(scope="module")
def alert_rules() -> dict[str, dict[str, Any]]:
    data = _load_yaml(PROMETHEUS_DIR / "alerts.yml")
    rules = [rule for group in data["groups"] for rule in group["rules"]]
    assert all("alert" in r for r in rules), "alerts.yml holds alerting rules only"
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), f"duplicate alert names: {names}"
    return {r["alert"]: r for r in rules}


# -- services ---------------------------------------------------------------------------------


def test_expected_services(services: dict[str, Any]) -> None:
    missing = EXPECTED_SERVICES - set(services)
    assert not missing, f"services missing from docker-compose.yml: {sorted(missing)}"


def test_depends_on_targets_are_services(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for target, spec in _depends_on(service).items():
            assert target in services, f"{name} depends on unknown service {target}"
            condition = spec.get("condition", "service_started")
            assert condition in ("service_started", "service_healthy",
                                 "service_completed_successfully"), condition  # fmt: skip
            if condition == "service_healthy":
                assert services[target].get("healthcheck"), (
                    f"{name} waits for {target} to be healthy, but {target} has no healthcheck"
                )


def test_kafka_is_a_single_kraft_node(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.9.1"
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    listeners = _listeners(env["KAFKA_LISTENERS"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    protocols = dict(
        item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")
    )
    controller = env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert controller in listeners and controller not in advertised
    assert set(listeners) <= set(protocols)
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert voters == [f"{node_id}@kafka:{listeners[controller][1]}"]
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):  # fmt: skip
        assert env[key] == "1", key
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert env.get("CLUSTER_ID"), "KRaft needs a cluster id to format its storage"

    # One listener for the other containers (kafka:<port>), one for the host (127.0.0.1).
    internal = [n for n, (host, _) in advertised.items() if host == "kafka"]
    external = [n for n, (host, _) in advertised.items() if host in ("127.0.0.1", "localhost")]
    assert len(internal) == 1 and len(external) == 1, advertised
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] == internal[0]
    for name in internal + external:
        assert listeners[name][1] == advertised[name][1], f"{name} listens and advertises apart"
    ext_port = str(advertised[external[0]][1])
    assert {"host_ip": "127.0.0.1", "published": ext_port, "target": ext_port} in _ports(kafka)
    assert kafka.get("healthcheck", {}).get("test"), "kafka needs a healthcheck"


def _internal_bootstrap(services: dict[str, Any]) -> str:
    env = _env(services["kafka"])
    advertised = _listeners(env["KAFKA_ADVERTISED_LISTENERS"])
    (port,) = [p for host, p in advertised.values() if host == "kafka"]
    return f"kafka:{port}"


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    assert isinstance(command, list), "give commands in exec (list) form"
    return [str(c) for c in command]


def _parse_cli(argv: list[str]) -> click.Context:
    """Parse a ``sluice ...`` command line with the real CLI (validates it, runs nothing)."""
    assert argv[0] == "sluice", argv
    command: click.Command = cli_main
    args = argv[1:]
    ctx = click.Context(cli_main, info_name="sluice")
    while isinstance(command, click.Group):
        sub = command.get_command(ctx, args[0])
        assert sub is not None, f"unknown sluice command {args[0]!r} in {argv}"
        command, args = sub, args[1:]
    return command.make_context(command.name, list(args))


def test_workers(services: dict[str, Any]) -> None:
    bootstrap = _internal_bootstrap(services)
    expected = {"sluice-fused": ("fused", None)}
    expected |= {f"sluice-{stage}": ("split", stage) for stage in SPLIT_STAGES}
    for name, (mode, stage) in expected.items():
        service = services[name]
        ctx = _parse_cli(_command(service))
        assert ctx.params["mode"] == mode and ctx.params["stage"] == stage, (name, ctx.params)
        assert service.get("profiles") == [mode], f"{name} belongs in profile {mode!r}"
        deps = _depends_on(service)
        assert deps.get("kafka", {}).get("condition") == "service_healthy", name
        assert deps.get("model-init", {}).get("condition") == "service_completed_successfully"
        env = _env(service)
        assert env["SLUICE_BOOTSTRAP"] == bootstrap, name
        assert env["SLUICE_METRICS_HOST"] == "0.0.0.0", name
        assert env["SLUICE_METRICS_PORT"] == str(METRICS_PORT), name
        assert env["SLUICE_MODEL_DIR"] == "/models", name
        models = [m for m in _volumes(service) if m["target"] == "/models"]
        assert models and models[0]["source"] == "models" and models[0]["type"] == "volume"
        assert not _ports(service), f"{name} publishes ports; Prometheus scrapes it inside"


def test_model_init(services: dict[str, Any]) -> None:
    service = services["model-init"]
    _parse_cli(_command(service))
    assert _command(service)[1:3] == ["model", "init-demo"]
    assert service.get("restart", "no") == "no"
    env = _env(service)
    mounts = {m["target"]: m for m in _volumes(service)}
    target = env["SLUICE_MODEL_DIR"]
    assert mounts[target]["source"] == "models" and not mounts[target]["read_only"]


def test_sluice_env_vars_are_settings(services: dict[str, Any]) -> None:
    """Every SLUICE_* variable names a Settings field, and Settings accepts the values."""
    fields = {ENV_PREFIX + f.name.upper() for f in dataclasses.fields(Settings)}
    for name, service in services.items():
        env = {k: v for k, v in _env(service).items() if k.startswith(ENV_PREFIX)}
        unknown = set(env) - fields
        assert not unknown, f"{name}: {sorted(unknown)} are not sluice settings"
        if env:
            Settings.from_env(env)


def test_profiles(compose: dict[str, Any], services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name not in WORKERS:
            assert not service.get("profiles"), f"{name} must run in every profile"
    # The fused worker is the default: compose/.env activates its profile.
    dotenv = dict(
        line.split("=", 1)
        for line in (COMPOSE / ".env").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    assert dotenv.get("COMPOSE_PROFILES") == "fused"


def test_bind_mounts_exist_and_named_volumes_are_declared(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, service in compose["services"].items():
        for mount in _volumes(service):
            if mount["type"] == "bind":
                source = (COMPOSE / mount["source"]).resolve()
                assert source.is_relative_to(REPO), f"{name} mounts {source}, outside the repo"
                assert source.exists(), f"{name} mounts {mount['source']}, which does not exist"
            else:
                used.add(mount["source"])
                assert mount["source"] in declared, (
                    f"{name} uses volume {mount['source']!r}, not declared under volumes:"
                )
    assert not declared - used, f"declared volumes nobody uses: {sorted(declared - used)}"


def test_published_ports_bind_to_localhost(services: dict[str, Any]) -> None:
    published = {}
    for name, service in services.items():
        for port in _ports(service):
            assert port["host_ip"] == "127.0.0.1", f"{name} publishes {port} beyond 127.0.0.1"
            assert port["published"], f"{name}: give the host port explicitly"
            assert port["published"] not in published, (
                f"{name} and {published[port['published']]} publish host port {port['published']}"
            )
            published[port["published"]] = name
    assert published.get("9090") == "prometheus" and published.get("3000") == "grafana"


def test_dockerfile(services: dict[str, Any]) -> None:
    dockerfiles = set()
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        if isinstance(build, str):
            build = {"context": build}
        context = (COMPOSE / _interpolate(build.get("context", "."))).resolve()
        assert context == REPO, f"{name} builds from {context}; the context is the repo root"
        dockerfile = context / _interpolate(build.get("dockerfile", "Dockerfile"))
        assert dockerfile.is_file(), f"{name}: {dockerfile} does not exist"
        dockerfiles.add(dockerfile)
    assert set(WORKERS) | {"model-init"} <= {n for n, s in services.items() if s.get("build")}
    assert dockerfiles == {COMPOSE / "Dockerfile"}
    text = (COMPOSE / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"^RUN pip install\b.*(\.|/opt/sluice)$", text, re.M)
    assert "download.pytorch.org/whl/cpu" in text, "say how to get CPU-only torch"


# -- prometheus -------------------------------------------------------------------------------


def _mount_target(service: dict[str, Any], source: Path) -> str:
    for mount in _volumes(service):
        if mount["type"] == "bind" and (COMPOSE / mount["source"]).resolve() == source:
            return mount["target"]
    raise AssertionError(f"{source} is not mounted")


def test_prometheus_config(services: dict[str, Any]) -> None:
    prometheus = services["prometheus"]
    assert str(prometheus["image"]).startswith("prom/prometheus")
    config_path = PROMETHEUS_DIR / "prometheus.yml"
    config = _load_yaml(config_path)
    config_target = _mount_target(prometheus, config_path)
    assert f"--config.file={config_target}" in prometheus.get("command", [config_target])

    # Rule files resolve the same way on the host and in the container.
    rule_files = config.get("rule_files") or []
    assert rule_files, "prometheus.yml loads no rules"
    for rule_file in rule_files:
        host = (config_path.parent / rule_file).resolve()
        assert host.is_file(), f"rule file {rule_file} does not exist"
        in_container = Path(config_target).parent / rule_file
        assert _mount_target(prometheus, host) == str(in_container), rule_file

    metric_labels = _metric_label_names()
    scraped = set()
    for job in config["scrape_configs"]:
        for static in job.get("static_configs", []):
            clash = set(static.get("labels") or {}) & metric_labels
            assert not clash, f"target labels {clash} would rename the metrics' own labels"
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                if host == "localhost":
                    continue
                assert host in services, f"job {job['job_name']} scrapes unknown service {host}"
                if host in WORKERS:
                    assert int(port) == int(_env(services[host])["SLUICE_METRICS_PORT"]), target
                    assert job.get("metrics_path", "/metrics") == "/metrics"
                scraped.add(host)
    assert set(WORKERS) <= scraped, f"workers not scraped: {sorted(set(WORKERS) - scraped)}"


def _threshold(expr: str, op: str = ">") -> float:
    matches = re.findall(rf"{re.escape(op)}\s*([0-9.]+(?:e-?\d+)?)\s*$", expr.strip())
    assert matches, f"no trailing '{op} <threshold>' in {expr!r}"
    return float(matches[-1])


def _rule_using(rules: dict[str, dict[str, Any]], metric: str) -> dict[str, Any]:
    found = [r for r in rules.values() if metric in _promql_metric_names(r["expr"])]
    assert len(found) == 1, f"expected one alert on {metric}, found {[r['alert'] for r in found]}"
    return found[0]


def test_alert_rules_thresholds(alert_rules: dict[str, dict[str, Any]]) -> None:
    assert len(alert_rules) >= 4

    latency = _rule_using(alert_rules, "sluice_request_latency_seconds_bucket")
    assert re.match(r"histogram_quantile\(\s*0\.99\s*,", latency["expr"].strip())
    assert _threshold(latency["expr"]) == 0.5
    assert latency.get("for") == "5m"

    gpu = _rule_using(alert_rules, "sluice_gpu_memory_used_bytes")
    assert _promql_metric_names(gpu["expr"]) == {
        "sluice_gpu_memory_used_bytes", "sluice_gpu_memory_total_bytes",
    }  # fmt: skip
    assert re.search(r"sluice_gpu_memory_used_bytes\s*/\s*sluice_gpu_memory_total_bytes",
                     gpu["expr"])  # fmt: skip
    assert _threshold(gpu["expr"]) == 0.9
    assert gpu.get("for") == "1m"

    loads = _rule_using(alert_rules, "sluice_model_load_failures_total")
    assert re.search(r"rate\(sluice_model_load_failures_total\[\w+\]\)\s*\)\s*/\s*sum\(\s*"
                     r"rate\(sluice_requests_total\[\w+\]\)", loads["expr"])  # fmt: skip
    assert _threshold(loads["expr"]) == 0.01

    lag = alert_rules["SluiceConsumerBacklog"]
    assert re.match(r"max\b", lag["expr"].strip())
    assert _promql_metric_names(lag["expr"]) == {"sluice_consumer_lag"}
    assert _threshold(lag["expr"]) == 100
    assert lag.get("for") == "2m"

    time_lag = _rule_using(alert_rules, "sluice_consumer_time_lag_seconds")
    assert re.match(r"max\b", time_lag["expr"].strip())
    assert _threshold(time_lag["expr"]) == 30
    assert time_lag.get("for") == "1m"

    # A worker that stopped consuming: lag with a committed offset that does not move, or no
    # worker reporting lag at all.
    stalled = _rule_using(alert_rules, "sluice_consumer_committed_offset")
    assert re.search(r"sluice_consumer_lag\)\s*>\s*0\b", stalled["expr"])
    assert re.search(r"changes\(sluice_consumer_committed_offset\[1m\]\)\)\s*==\s*0",
                     stalled["expr"])  # fmt: skip
    assert stalled.get("for") == "1m"
    absent = [r for r in alert_rules.values() if r["expr"].strip().startswith("absent(")]
    assert [r["expr"].strip() for r in absent] == ["absent(sluice_consumer_lag)"]
    assert absent[0].get("for") == "2m"

    for rule in alert_rules.values():
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), rule["alert"]
        assert rule.get("annotations", {}).get("summary"), rule["alert"]


def test_alert_rules_use_exported_metrics(
    alert_rules: dict[str, dict[str, Any]], exported: set[str]
) -> None:
    for rule in alert_rules.values():
        names = _promql_metric_names(rule["expr"])
        unknown = names - exported - PENDING_METRICS
        assert not unknown, (
            f"{rule['alert']} queries {sorted(unknown)}, not in pipeline/observability/metrics.py"
        )
    text = (PROMETHEUS_DIR / "alerts.yml").read_text()
    for pending in PENDING_METRICS - exported:
        comments = "\n".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
        assert pending in comments, f"alerts.yml must say that {pending} is not exported yet"


# -- grafana ----------------------------------------------------------------------------------


def _dashboard(path: Path = DASHBOARD) -> dict[str, Any]:
    return json.loads(path.read_text())


def _datasource_uids(node: Any) -> set[str]:
    uids = set()
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            uids.add(node["datasource"].get("uid"))
        for value in node.values():
            uids |= _datasource_uids(value)
    elif isinstance(node, list):
        for value in node:
            uids |= _datasource_uids(value)
    return uids


def test_grafana_provisioning(services: dict[str, Any]) -> None:
    grafana = services["grafana"]
    assert str(grafana["image"]).startswith("grafana/grafana")
    files = sorted((GRAFANA_DIR / "provisioning").rglob("*.y*ml"))
    assert {f.relative_to(GRAFANA_DIR).as_posix() for f in files} >= {
        "provisioning/datasources/prometheus.yml", "provisioning/dashboards/sluice.yml",
    }  # fmt: skip
    for f in files:
        data = _load_yaml(f)
        assert isinstance(data, dict) and data.get("apiVersion") == 1, f

    for sub in ("datasources", "dashboards"):
        target = _mount_target(grafana, (GRAFANA_DIR / "provisioning" / sub).resolve())
        assert target == f"/etc/grafana/provisioning/{sub}"

    datasources = _load_yaml(GRAFANA_DIR / "provisioning/datasources/prometheus.yml")
    (ds,) = [d for d in datasources["datasources"] if d["type"] == "prometheus"]
    match = re.fullmatch(r"http://([\w-]+):(\d+)/?", ds["url"])
    assert match, ds["url"]
    assert match.group(1) in services
    assert any(p["target"] == match.group(2) for p in _ports(services[match.group(1)]))

    providers = _load_yaml(GRAFANA_DIR / "provisioning/dashboards/sluice.yml")["providers"]
    dashboards_target = _mount_target(grafana, (GRAFANA_DIR / "dashboards").resolve())
    assert [p["options"]["path"] for p in providers] == [dashboards_target]
    assert {p.name for p in DASHBOARDS} >= {
        "pipeline-overview.json", "consumer-lag.json", "batching-gpu.json",
    }  # fmt: skip

    # Panels and variables of every dashboard query the provisioned data source by its uid.
    for path in DASHBOARDS:
        assert _datasource_uids(_dashboard(path)) == {ds["uid"]}, path.name
    uids = [_dashboard(path)["uid"] for path in DASHBOARDS]
    assert len(uids) == len(set(uids)), f"dashboard uids must be unique: {uids}"


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    exprs = []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("expr"), str):
                exprs.append(node["expr"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(dashboard)
    return exprs


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_only_metrics_the_worker_serves(path: Path, served: set[str]) -> None:
    """Every metric a dashboard queries is on a worker's /metrics (pipeline.observability.web)."""
    dashboard = _dashboard(path)
    assert dashboard.get("uid") and dashboard.get("title")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    exprs = _exprs(dashboard)
    assert exprs
    for expr in exprs:
        names = _promql_metric_names(expr)
        assert names, f"query selects no metric: {expr}"
        unknown = names - served
        assert not unknown, f"{path.name} queries {sorted(unknown)}, not on a worker's /metrics"
    for var in dashboard.get("templating", {}).get("list", []):
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for selector in re.findall(r"label_values\(\s*([^,)]+)\s*,", query):
            assert _promql_metric_names(selector) <= served, query


def test_dashboard_panels() -> None:
    exprs = _exprs(_dashboard())
    joined = "\n".join(exprs)
    assert re.search(r"sum by \(outcome\) \(rate\(sluice_requests_total\b", joined)
    for q in ("0.5", "0.95", "0.99"):
        assert re.search(rf"histogram_quantile\({q}, .*sluice_request_latency_seconds_bucket",
                         joined), f"no p{q} latency panel"  # fmt: skip
    assert "sluice_batch_size_bucket" in joined
    assert any(
        "sluice_consumer_lag" in e and re.search(r"by \([^)]*\bpartition\b", e) for e in exprs
    ), "consumer lag must be shown by partition"
    assert "sluice_inflight_requests" in joined


def _by_partition(exprs: list[str], metric: str) -> bool:
    # max, not sum: every worker reports its whole group, so sum would count a partition once
    # per worker.
    pattern = rf"max by \([^)]*\bpartition\b[^)]*\) \({metric}\b"
    return any(re.search(pattern, e) for e in exprs)


def test_lag_dashboard_panels() -> None:
    exprs = _exprs(_dashboard(GRAFANA_DIR / "dashboards" / "consumer-lag.json"))
    assert _by_partition(exprs, "sluice_consumer_lag")
    assert _by_partition(exprs, "sluice_consumer_time_lag_seconds")
    assert any("sluice_consumer_committed_offset" in e for e in exprs)
    assert any("sluice_paused_partitions" in e for e in exprs)
    for path in DASHBOARDS:
        for e in _exprs(_dashboard(path)):
            assert not re.search(r"sum by \([^)]*partition[^)]*\) \(sluice_consumer", e), e


def test_batching_gpu_dashboard_panels() -> None:
    joined = "\n".join(_exprs(_dashboard(GRAFANA_DIR / "dashboards" / "batching-gpu.json")))
    assert re.search(r"histogram_quantile\(0\.5, .*sluice_batch_size_bucket", joined)
    assert re.search(r"histogram_quantile\(0\.99, .*sluice_inference_seconds_bucket", joined)
    for metric in (
        "sluice_gpu_utilization_ratio",
        "sluice_gpu_memory_used_bytes",
        "sluice_gpu_memory_total_bytes",
    ):
        assert metric in joined


# -- promtool (Debian package `prometheus`; make sysdeps installs it) -------------------------


def _promtool(*args: str) -> None:
    assert shutil.which("promtool"), "promtool not installed: Debian package `prometheus`"
    result = subprocess.run(["promtool", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_promtool_check_rules() -> None:
    _promtool("check", "rules", "compose/prometheus/alerts.yml")


def test_promtool_test_rules() -> None:
    _promtool("test", "rules", "compose/prometheus/alerts_test.yml")


def test_promtool_check_config() -> None:
    _promtool("check", "config", "compose/prometheus/prometheus.yml")


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_promtool_parses_dashboard_queries(path: Path, tmp_path: Path) -> None:
    """Each dashboard query, with Grafana's variables filled in, is valid PromQL.

    ``promtool query`` needs a server; ``check rules`` parses offline, so every query becomes
    a recording rule.
    """
    grafana_vars = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "1h"}
    rules = []
    for i, expr in enumerate(_exprs(_dashboard(path))):
        for var, value in grafana_vars.items():
            expr = expr.replace(var, value)
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    rules_path = tmp_path / "dashboard_rules.yml"
    rules_path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    _promtool("check", "rules", str(rules_path))
