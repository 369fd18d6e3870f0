#!/usr/bin/env bash
# Build the ccgate session image (container/Dockerfile) without needing an image registry.
#
# Usage: scripts/build-image.sh [--tag TAG] [--ca-bundle PATH] [--base IMAGE] [--test-services]
#   --tag        image tag (default: $CCGATE_IMAGE or ccgate-session:latest)
#   --test-services  also build the images the test suite runs through testcontainers
#                (ccgate-test-redis, ccgate-test-postgres, ccgate-test-s3, from
#                container/services/, on the same base)
#   --ca-bundle  PEM bundle trusted inside the build and the image, for HTTPS through a
#                TLS-inspecting proxy (default: $CCGATE_CA_BUNDLE, else $PIP_CERT, else the
#                system bundle /etc/ssl/certs/ca-certificates.crt)
#   --base       base image (default: debian:bookworm-slim when it can be pulled, otherwise a
#                local Debian bookworm image built with debootstrap and imported as
#                ccgate-base:bookworm)
# Rebuilds hit the layer cache: only a changed wrapper/ re-runs the last layers.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
tag=${CCGATE_IMAGE:-ccgate-session:latest}
ca_bundle=${CCGATE_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}
base=${CCGATE_BASE_IMAGE:-}
test_services=0

while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --ca-bundle) ca_bundle=$2; shift 2 ;;
    --base) base=$2; shift 2 ;;
    --test-services) test_services=1; shift ;;
    -h|--help) sed -n '2,17p' "$0"; exit 0 ;;
    *) echo "build-image: unknown option $1" >&2; exit 2 ;;
  esac
done

log() { echo "build-image: $*" >&2; }

ensure_local_base() {
  local local_base=ccgate-base:bookworm
  if docker image inspect "$local_base" >/dev/null 2>&1; then
    echo "$local_base"; return
  fi
  command -v debootstrap >/dev/null || { log "debootstrap is missing (apt-get install debootstrap)"; exit 1; }
  local rootfs
  rootfs=$(mktemp -d /tmp/ccgate-rootfs.XXXXXX)
  log "building a local Debian bookworm base with debootstrap (about 30 s)"
  debootstrap --variant=minbase bookworm "$rootfs" >/tmp/ccgate-debootstrap.log 2>&1 \
    || { log "debootstrap failed, see /tmp/ccgate-debootstrap.log"; rm -rf "$rootfs"; exit 1; }
  rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
  tar -C "$rootfs" -c . | docker import - "$local_base" >/dev/null
  rm -rf "$rootfs"
  echo "$local_base"
}

if [ -z "$base" ]; then
  if docker image inspect debian:bookworm-slim >/dev/null 2>&1 \
     || timeout 20 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
    base=debian:bookworm-slim
  else
    log "debian:bookworm-slim cannot be pulled; using a local base"
    base=$(ensure_local_base)
  fi
fi

[ -r "$ca_bundle" ] || { log "CA bundle $ca_bundle is not readable (use --ca-bundle)"; exit 1; }

ctx=$(mktemp -d /tmp/ccgate-build.XXXXXX)
trap 'rm -rf "$ctx"' EXIT
cp "$here/container/Dockerfile" "$ctx/Dockerfile"
cp "$ca_bundle" "$ctx/build-ca.crt"
mkdir -p "$ctx/wrapper"
cp "$here"/wrapper/*.py "$ctx/wrapper/"

log "building $tag from $base"
docker build -q --build-arg BASE_IMAGE="$base" -t "$tag" "$ctx" >/dev/null
log "built $tag"

if [ "$test_services" = 1 ]; then
  for service in redis postgres s3; do
    sctx=$(mktemp -d /tmp/ccgate-build-svc.XXXXXX)
    cp "$here/container/services/$service.Dockerfile" "$sctx/Dockerfile"
    cp "$ca_bundle" "$sctx/build-ca.crt"
    docker build -q --build-arg BASE_IMAGE="$base" -t "ccgate-test-$service:latest" "$sctx" \
      >/dev/null
    rm -rf "$sctx"
    log "built ccgate-test-$service:latest"
  done
fi
