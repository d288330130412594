"""deploy/: the Helm chart rendered (`helm template`) for each shape a user picks, and every
resource checked offline against the schema the cluster would check it with.

- Kubernetes' own kinds against Kubernetes' OpenAPI schemas (the PyPI package
  kubernetes-validate), strictly (an unknown field is an error), for the oldest version the
  chart supports and the newest the package knows.
- KEDA's and the Prometheus Operator's kinds against their CRDs' openAPIV3Schema, from
  their Go modules (`deploy/tools.sh`), strictly as well.

Then what the chart promises: the PrometheusRule is compose's alerts.yml, autoscaling never
goes past the partitions, the grace period outlasts the worker's own shutdown bound, the
ConfigMap is settings the worker accepts, and the time-lag query selects the series a
worker's /metrics serves.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import Settings
from pipeline.observability.metrics import make_metrics
from pipeline.observability.web import MetricsServer
from tests.unit.observability.test_web import get

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "sluice"
ALERTS = ROOT / "compose" / "prometheus" / "alerts.yml"
# The oldest Kubernetes the chart supports (Chart.yaml's kubeVersion) and the newest
# kubernetes-validate ships schemas for.
KUBERNETES = ["1.27.0", kubernetes_validate.utils.latest_version()]


@cache
def tools() -> dict[str, str]:
    """helm and the CRDs, fetched once by deploy/tools.sh (`make deploy-tools`)."""
    done = subprocess.run(
        ["bash", str(ROOT / "deploy" / "tools.sh")], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, f"deploy/tools.sh failed:\n{done.stderr[-3000:]}"
    paths: dict[str, str] = json.loads(done.stdout.strip().splitlines()[-1])
    return paths


def render(values: dict[str, Any] | None = None, kube: str = "1.30.0") -> list[dict[str, Any]]:
    """The chart's resources for ``values`` (on top of values.yaml)."""
    done = _helm(values, kube)
    assert done.returncode == 0, done.stderr[-3000:]
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def _helm(values: dict[str, Any] | None, kube: str = "1.30.0") -> subprocess.CompletedProcess[str]:
    command = [tools()["helm"], "template", "t", str(CHART), "--kube-version", kube, "-f", "-"]
    return subprocess.run(
        command, input=json.dumps(values or {}), capture_output=True, text=True, timeout=120
    )


def of_kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


# The shapes a user picks: the defaults (fused, KEDA on time lag, a PodMonitor); split with
# an HPA, SASL from values, TLS and GPUs; split with KEDA's Kafka scaler and a Secret of the
# user's; and no autoscaling or monitoring at all.
SHAPES: dict[str, dict[str, Any]] = {
    "default": {},
    "split-hpa-sasl-gpu": {
        "mode": "split",
        "kafka": {
            "securityProtocol": "SASL_SSL",
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "sluice", "password": "s3cret"},
            "tlsCASecret": "kafka-ca",
        },
        "gpus": 1,
        "autoscaling": {"kind": "hpa"},
        "monitoring": {"monitor": "ServiceMonitor", "labels": {"release": "prometheus"}},
        "settings": {"SLUICE_MAX_BATCH_SIZE": "64"},
    },
    "split-keda-kafka": {
        "mode": "split",
        "kafka": {
            "securityProtocol": "SASL_SSL",
            "sasl": {"mechanism": "SCRAM-SHA-256", "existingSecret": "team-kafka"},
        },
        "autoscaling": {"trigger": "kafka"},
        "models": {"initDemo": False, "volume": {"persistentVolumeClaim": {"claimName": "m"}}},
    },
    "static": {
        "autoscaling": {"enabled": False},
        "replicas": 3,
        "delivery": "exactly_once",
        "monitoring": {"monitor": "", "prometheusRule": False, "dashboards": False},
    },
}


# -- the schemas ----------------------------------------------------------------------------


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the CRD's schema for that version, made strict."""
    schemas = {}
    for path in sorted(Path(tools()["crds"]).glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = strict(version["schema"]["openAPIV3Schema"])
            schemas[(f"{group}/{version['name']}", kind)] = schema
    return schemas


def strict(schema: Any) -> Any:
    """An openAPIV3Schema as JSON Schema: ``nullable`` as a null type, Go's regular
    expressions as Python's, and an object that
    lists its properties refusing others, as the API server's pruning would drop them
    silently (a typo in a field name would otherwise pass)."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    pattern = out.get("pattern")
    if isinstance(pattern, str) and "(?i)" in pattern:  # Go's inline flag, anywhere
        out["pattern"] = "(?i)" + pattern.replace("(?i)", "")
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def check(resource: dict[str, Any]) -> None:
    """Validate one rendered resource against its schema (every Kubernetes version)."""
    key = (resource["apiVersion"], resource["kind"])
    if key[0].split("/")[0] in ("keda.sh", "monitoring.coreos.com"):
        assert key in crd_schemas(), f"no CRD schema for {key}"
        jsonschema.Draft202012Validator(crd_schemas()[key]).validate(resource)
        return
    for version in KUBERNETES:
        kubernetes_validate.validate(resource, version, strict=True)


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_every_resource_validates(shape: str) -> None:
    resources = render(SHAPES[shape])
    assert resources
    for resource in resources:
        check(resource)


def test_the_checks_catch_a_bad_field() -> None:
    """The validators refuse what the API server would: a strict check is not a no-op."""
    deployment = of_kind(render(), "Deployment")[0]
    bad = copy.deepcopy(deployment)
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        check(bad)
    scaled = copy.deepcopy(of_kind(render(), "ScaledObject")[0])
    scaled["spec"]["maxReplicas"] = 3  # KEDA's field is maxReplicaCount
    with pytest.raises(jsonschema.ValidationError):
        check(scaled)
    scaled = copy.deepcopy(of_kind(render(), "ScaledObject")[0])
    scaled["spec"]["pollingInterval"] = "15"
    with pytest.raises(jsonschema.ValidationError):
        check(scaled)


# -- what the chart promises ----------------------------------------------------------------


def test_split_mode_is_one_deployment_per_stage_each_scaled_on_its_own_group() -> None:
    resources = render({"mode": "split", "topics": {"prefix": "team"}})
    deployments = {d["metadata"]["name"]: d for d in of_kind(resources, "Deployment")}
    assert sorted(deployments) == ["t-sluice-gateway", "t-sluice-infer", "t-sluice-respond"]
    for name, d in deployments.items():
        stage = name.rsplit("-", 1)[1]
        assert d["spec"]["template"]["spec"]["containers"][0]["args"] == [
            "worker", "--mode", "split", "--stage", stage
        ]  # fmt: skip
    queries = {
        s["spec"]["scaleTargetRef"]["name"]: s["spec"]["triggers"][0]["metadata"]["query"]
        for s in of_kind(resources, "ScaledObject")
    }
    settings = Settings(topic_prefix="team")
    assert queries == {
        name: f'max(sluice_consumer_time_lag_seconds{{group="{settings.group_id(stage)}"}})'
        for name, stage in ((n, n.rsplit("-", 1)[1]) for n in deployments)
    }


def test_the_prometheus_rule_is_compose_alerts_yml() -> None:
    (rule,) = of_kind(render(), "PrometheusRule")
    assert rule["spec"]["groups"] == yaml.safe_load(ALERTS.read_text())["groups"]
    assert (CHART / "files" / "alerts.yml").resolve() == ALERTS.resolve()  # a link, not a copy


def test_dashboards_are_compose_dashboards() -> None:
    (config,) = [c for c in of_kind(render(), "ConfigMap") if "dashboards" in c["metadata"]["name"]]
    dashboards = ROOT / "compose" / "grafana" / "dashboards"
    assert sorted(config["data"]) == sorted(p.name for p in dashboards.glob("*.json"))
    for name, text in config["data"].items():
        assert json.loads(text) == json.loads((dashboards / name).read_text())


@pytest.mark.parametrize("kind", ["keda", "hpa"])
def test_autoscaling_never_goes_past_the_partitions(kind: str) -> None:
    values = {"topics": {"partitions": 6}, "autoscaling": {"kind": kind, "maxReplicas": 40}}
    resources = render(values)
    if kind == "keda":
        (scaled,) = of_kind(resources, "ScaledObject")
        assert scaled["spec"]["maxReplicaCount"] == 6
        behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    else:
        (hpa,) = of_kind(resources, "HorizontalPodAutoscaler")
        assert hpa["spec"]["maxReplicas"] == 6
        behavior = hpa["spec"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] == 300  # no flapping
    small = render({"topics": {"partitions": 6}, "autoscaling": {"kind": kind, "maxReplicas": 4}})
    scaled_max = [
        r["spec"].get("maxReplicaCount", r["spec"].get("maxReplicas"))
        for r in small
        if r["kind"] in ("ScaledObject", "HorizontalPodAutoscaler")
    ]
    assert scaled_max == [4]


def test_keda_kafka_scaler_alternative() -> None:
    resources = render(SHAPES["split-keda-kafka"])
    triggers = {
        s["metadata"]["name"]: s["spec"]["triggers"] for s in of_kind(resources, "ScaledObject")
    }
    kafka = triggers["t-sluice-gateway"][0]
    assert kafka["type"] == "kafka"
    assert kafka["metadata"]["consumerGroup"] == "sluice-gateway"
    assert kafka["metadata"]["topic"] == "sluice.requests"
    assert kafka["metadata"]["allowIdleConsumers"] == "false"
    assert kafka["authenticationRef"]["name"] == "t-sluice-gateway"
    (auth,) = [a for a in of_kind(resources, "TriggerAuthentication") if "gateway" in str(a)]
    assert {t["name"] for t in auth["spec"]["secretTargetRef"]} == {"team-kafka"}
    assert not of_kind(resources, "Secret")  # the user's own Secret is used, none is made


def test_grace_period_outlasts_the_shutdown_bound_and_probes_are_the_workers() -> None:
    values = {"shutdown": {"preStopSeconds": 7, "drainSeconds": 40, "shutdownSeconds": 50}}
    (deployment,) = of_kind(render(values), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] > 7 + 50
    (container,) = pod["containers"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", "7"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_the_configmap_and_secret_are_settings_the_worker_accepts(shape: str) -> None:
    resources = render(SHAPES[shape])
    (config,) = [c for c in of_kind(resources, "ConfigMap") if c["metadata"]["name"] == "t-sluice"]
    environ = dict(config["data"])
    for secret in of_kind(resources, "Secret"):
        environ |= {f"SLUICE_SASL_{k.upper()}": v for k, v in secret["stringData"].items()}
    if "existingSecret" in str(SHAPES[shape]):
        environ |= {"SLUICE_SASL_USERNAME": "u", "SLUICE_SASL_PASSWORD": "pw-of-the-secret"}
    environ["SLUICE_WORKER_ID"] = "t-sluice-fused-7d9f-abcde"
    settings = Settings.from_env(environ)
    assert settings.metrics_host == "0.0.0.0" and settings.metrics_port == 9400
    assert settings.preload_models is True
    (deployment, *_) = of_kind(resources, "Deployment")
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_timeout_s > settings.drain_timeout_s
    if "SASL" in str(SHAPES[shape]):
        assert settings.sasl_password is not None and settings.sasl_password not in repr(settings)


@pytest.mark.parametrize(
    ("values", "error"),
    [
        ({"mode": "fuse"}, 'mode must be fused or split, got "fuse"'),
        ({"settings": {"MAX_BATCH": "9"}}, 'settings: "MAX_BATCH" is not a SLUICE_ setting'),
        ({"autoscaling": {"kind": "vpa"}}, 'autoscaling.kind must be keda or hpa, got "vpa"'),
        ({"autoscaling": {"kind": "hpa", "trigger": "kafka"}}, "needs autoscaling.kind keda"),
        ({"monitoring": {"monitor": "Probe"}}, "monitoring.monitor must be PodMonitor"),
        ({"kafka": {"sasl": {"password": "x"}}}, "kafka.sasl.username is required"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(values: dict[str, Any], error: str) -> None:
    done = _helm(values)
    assert done.returncode != 0
    assert error in done.stderr


def test_the_time_lag_query_selects_what_a_worker_serves() -> None:
    """The ScaledObject's query, parsed by Prometheus' own parser (promtool), names a metric
    and labels that a worker's /metrics serves; a live worker and a real Prometheus evaluate
    it in tests/integration/test_observability.py."""
    (scaled,) = of_kind(render({"topics": {"prefix": "team"}}), "ScaledObject")
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]
    promtool = shutil.which("promtool")
    assert promtool, "Debian package `prometheus` is not installed (make sysdeps)"
    rules = {"groups": [{"name": "q", "rules": [{"record": "sluice:time_lag", "expr": query}]}]}
    done = subprocess.run(
        [promtool, "check", "rules", "/dev/stdin"],
        input=yaml.safe_dump(rules),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    match = re.fullmatch(r'max\((\w+)\{group="([^"]+)"\}\)', query)
    assert match, query
    name, group = match.groups()
    metrics = make_metrics(True)
    assert group == Settings(topic_prefix="team").group_id("fused")
    metrics.consumer_time_lag.labels(group, "team.requests", "0").set(4.0)
    server = MetricsServer(metrics.registry).start()
    try:
        status, _, body = get(server.url + "/metrics")
    finally:
        server.stop()
    assert status == 200
    served = [
        s
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
        if s.name == name and s.labels.get("group") == group
    ]
    assert [s.value for s in served] == [pytest.approx(4.0, abs=1e-9)]
