#!/usr/bin/env bash
# Build the runtime base image for both tracefleet images from Debian packages alone:
# debootstrap a minimal bookworm (variant minbase) and `podman import` it as
#   localhost/tracefleet-base:bookworm-YYYYMMDD      (also tagged localhost/tracefleet-base:bookworm)
# Why not FROM debian:bookworm-slim@sha256:...: our build machines reach Debian's mirror but no
# container registry, so the base is made here. The dated tag records which mirror state it was
# built from; pass BASE_DATE to pin the tag, DEBIAN_MIRROR to use another (e.g. a snapshot) mirror.
# The same script also produces the build-stage base (tagged ...-build) with the toolchain for
# `make bpf` and for building wheels, since that cannot be pulled either.
#
# Usage: deploy/images/build-base.sh            (root; needs debootstrap and podman)
set -euo pipefail
DATE=${BASE_DATE:-$(date -u +%Y%m%d)}
SUITE=bookworm
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
NAME=${BASE_NAME:-localhost/tracefleet-base}
WORK=${WORKDIR:-$(mktemp -d /var/tmp/tracefleet-base.XXXXXX)}
log() { printf '[build-base] %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then log "run as root (debootstrap)"; exit 1; fi
command -v debootstrap >/dev/null || { log "apt-get install debootstrap"; exit 1; }
# podman import (buildah has no import); podman and buildah share /var/lib/containers/storage.
command -v podman >/dev/null || { log "apt-get install podman"; exit 1; }
IMPORT=(podman import); TAG=(podman tag)

# Runtime packages shared by both images. python3 (3.11) + venv; ca-certificates for TLS to
# the controller; no compilers. libbpf1 is added only in the agent image's own stage.
RUNTIME_PKGS=python3,python3-venv,ca-certificates,tini
# Build-stage packages: BPF toolchain (`make bpf`), pip wheel builds, the Python headers the
# compiled decode (agent/native/pydecode.c, `make native`) is built against.
BUILD_PKGS=$RUNTIME_PKGS,clang,llvm,libbpf-dev,bpftool,make,gcc,libc6-dev,python3-pip,python3-dev

slim() {  # drop what a container never reads: apt lists, docs, man pages, locales, caches
  local r=$1
  rm -rf "$r"/var/lib/apt/lists/* "$r"/var/cache/apt/*.bin "$r"/var/cache/apt/archives/*.deb \
         "$r"/usr/share/doc/* "$r"/usr/share/man/* "$r"/usr/share/info/* "$r"/var/log/* \
         "$r"/usr/share/locale/* "$r"/tmp/* "$r"/var/tmp/*
  # Same apt sources as the host so `apt-get install` in a Containerfile stage works.
  printf 'deb %s %s main\ndeb %s %s-updates main\ndeb http://deb.debian.org/debian-security %s-security main\n' \
    "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SUITE" >"$r"/etc/apt/sources.list
}

build() {  # build NAME:TAG PKGS
  local ref=$1 pkgs=$2 root
  root=$WORK/$(echo "$ref" | tr '/:' '__')
  log "debootstrap $SUITE ($pkgs) -> $root"
  debootstrap --variant=minbase --include="$pkgs" "$SUITE" "$root" "$MIRROR" >"$root.log" 2>&1 ||
    { tail -20 "$root.log" >&2; exit 1; }
  slim "$root"
  log "import $ref"
  tar --numeric-owner -C "$root" -c . | "${IMPORT[@]}" \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' - "$ref" >/dev/null
  rm -rf "$root" "$root.log"
}

mkdir -p "$WORK"
build "$NAME:$SUITE-$DATE" "$RUNTIME_PKGS"
"${TAG[@]}" "$NAME:$SUITE-$DATE" "$NAME:$SUITE"
build "$NAME:$SUITE-$DATE-build" "$BUILD_PKGS"
"${TAG[@]}" "$NAME:$SUITE-$DATE-build" "$NAME:$SUITE-build"
rmdir "$WORK" 2>/dev/null || true
log "done: $NAME:$SUITE-$DATE and $NAME:$SUITE-$DATE-build"
