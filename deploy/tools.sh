#!/usr/bin/env bash
# The tools that check deploy/ offline, fetched once and cached under
# $SLUICE_CACHE_DIR/tools (keyed on their versions); prints their paths as JSON.
#   helm: built with the machine's Go from the Go module proxy (a few minutes, once);
#   the CRDs of KEDA (ScaledObject, TriggerAuthentication) and of the Prometheus Operator
#   (PodMonitor, ServiceMonitor, PrometheusRule): from their Go modules, the same proxy.
# Kubernetes' own schemas come with the PyPI package kubernetes-validate (the dev extra).
set -euo pipefail

HELM_VERSION=v3.22.0
KEDA_VERSION=v2.18.3
PROMETHEUS_OPERATOR_VERSION=v0.85.0

tools="${SLUICE_CACHE_DIR:-$HOME/.cache/sluice}/tools"
helm_dir="$tools/helm-$HELM_VERSION"
crds="$tools/crds-keda-$KEDA_VERSION-prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"

command -v go >/dev/null || { echo "deploy/tools.sh: needs Go (go.dev/dl, or Debian's golang-go)" >&2; exit 1; }

if [ ! -x "$helm_dir/helm" ]; then
    echo "deploy/tools.sh: building helm $HELM_VERSION (once)" >&2
    GOBIN="$helm_dir.tmp" go install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
    rm -rf "$helm_dir" && mv "$helm_dir.tmp" "$helm_dir"
fi

module_dir() {  # the unpacked module in Go's module cache
    go mod download -json "$1" | python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])'
}

if [ ! -d "$crds" ]; then
    keda=$(module_dir "github.com/kedacore/keda/v2@$KEDA_VERSION")
    operator=$(module_dir "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION")
    rm -rf "$crds.tmp" && mkdir -p "$crds.tmp"
    cp "$keda/config/crd/bases/keda.sh_scaledobjects.yaml" \
       "$keda/config/crd/bases/keda.sh_triggerauthentications.yaml" "$crds.tmp/"
    for kind in podmonitors servicemonitors prometheusrules; do
        cp "$operator/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$crds.tmp/"
    done
    chmod -R u+w "$crds.tmp" && mv "$crds.tmp" "$crds"
fi

printf '{"helm": "%s", "crds": "%s", "versions": {"helm": "%s", "keda": "%s", "prometheus_operator": "%s"}}\n' \
    "$helm_dir/helm" "$crds" "$HELM_VERSION" "$KEDA_VERSION" "$PROMETHEUS_OPERATOR_VERSION"
