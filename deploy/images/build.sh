#!/usr/bin/env bash
# Build localhost/tracefleet-agent:$VERSION and localhost/tracefleet-controller:$VERSION from the
# repository root, with buildah (preferred) or podman, then smoke-test each image and save it as
# an OCI archive under build/images/ for clusters without a registry:
#   ctr -n k8s.io images import build/images/tracefleet-agent-$VERSION.tar     (containerd)
#   kind load image-archive build/images/tracefleet-agent-$VERSION.tar         (kind)
#
# Env: VERSION (default: agent/pyproject.toml's), BASE_DATE (tag of the base image, default
# 20261122), ISOLATION (buildah isolation, default chroot: works in unprivileged CI containers
# where crun cannot set rlimits), BUILDER (buildah|podman), SAVE=0 to skip the archives,
# PIP_CERT (CA bundle handed to pip as a build secret; default: the host's bundle).
set -euo pipefail
cd "$(dirname "$0")/../.."
log() { printf '[build-images] %s\n' "$*" >&2; }

VERSION=${VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' agent/pyproject.toml)}
BASE_DATE=${BASE_DATE:-20261122}
BASE=localhost/tracefleet-base:bookworm-$BASE_DATE
BUILD_BASE=$BASE-build
ISOLATION=${ISOLATION:-chroot}
BUILDER=${BUILDER:-$(command -v buildah >/dev/null && echo buildah || echo podman)}

exists() { "$BUILDER" inspect --type image "$1" >/dev/null 2>&1; }
if ! exists "$BASE" || ! exists "$BUILD_BASE"; then
  log "base $BASE missing: running deploy/images/build-base.sh"
  BASE_DATE=$BASE_DATE deploy/images/build-base.sh
fi

build() {  # component
  local c=$1 ref=localhost/tracefleet-$1:$VERSION
  log "building $ref"
  local args=(-f "deploy/images/$c.Containerfile" -t "$ref" --layers
              --ignorefile deploy/images/containerignore
              --build-arg "BASE=$BASE" --build-arg "BUILD_BASE=$BUILD_BASE")
  # Hosts behind a TLS-intercepting proxy: hand pip the host's CA bundle as a build secret.
  local ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
  [[ -s $ca ]] && args+=(--secret "id=pip-ca,src=$ca")
  if [[ $BUILDER == buildah ]]; then
    buildah bud --isolation "$ISOLATION" "${args[@]}" .
  else
    podman build "${args[@]}" .
  fi
}

smoke() {  # ref, command...: run a command in the image without the OCI runtime (chroot)
  local ref=$1; shift
  local ctr; ctr=$(buildah from --pull-never "$ref")
  local rc=0
  buildah run --isolation "$ISOLATION" "$ctr" -- "$@" || rc=$?
  buildah rm "$ctr" >/dev/null
  return $rc
}

build agent
build controller

if command -v buildah >/dev/null; then
  log "smoke tests"
  smoke "localhost/tracefleet-agent:$VERSION" /bin/sh -c \
    'ls /usr/lib/x86_64-linux-gnu/libbpf.so.1 /usr/lib/aarch64-linux-gnu/libbpf.so.1 2>/dev/null | grep -q libbpf &&
     /opt/tracefleet/bin/python -c "import ctypes, tracefleet.agent, tracefleet.v1, grpc, prometheus_client; ctypes.CDLL(\"libbpf.so.1\")" &&
     ! command -v cc gcc clang >/dev/null && test "$(id -u)" = 0'
  smoke "localhost/tracefleet-controller:$VERSION" /bin/sh -c \
    '! ls /usr/lib/*-linux-gnu/libbpf.so* 2>/dev/null &&
     /opt/tracefleet/bin/python -c "import sqlite3, tracefleet.controller, tracefleet.v1, grpc, grpc_health, grpc_reflection, prometheus_client" &&
     ! command -v cc gcc clang >/dev/null'
  # USER is metadata, so check it from the image config (buildah run ignores nothing here).
  [[ $(buildah inspect --type image --format '{{.OCIv1.Config.User}}' "localhost/tracefleet-controller:$VERSION") == 10001:10001 ]]
fi

if [[ ${SAVE:-1} == 1 ]]; then
  mkdir -p build/images
  for c in agent controller; do
    rm -f "build/images/tracefleet-$c-$VERSION.tar"
    "$BUILDER" push "localhost/tracefleet-$c:$VERSION" "oci-archive:build/images/tracefleet-$c-$VERSION.tar:localhost/tracefleet-$c:$VERSION"
  done
  log "saved build/images/tracefleet-{agent,controller}-$VERSION.tar"
fi
log "done"
