#!/usr/bin/env bash
# Prepare this machine for ccgate (idempotent; Debian 12 / Ubuntu 24.04, as root):
#   - Docker engine (docker.io) if absent, started without systemd when needed
#   - with CCGATE_SETUP_GVISOR=1: gVisor's runsc, registered as a Docker runtime
#   - redis-server, PostgreSQL server programs, debootstrap (for the registry-less image build),
#     iptables (the sessions firewall), tinyproxy (egress allowlists)
#   - a Python >= 3.11 virtualenv in .venv with ccgate and its test tools
#   - the session image and the test suite's service images (scripts/build-image.sh; cached
#     layers make reruns fast)
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
log() { echo "setup: $*" >&2; }
die() { echo "setup: ERROR: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root (it installs packages and starts dockerd)"

# --- packages ---------------------------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v redis-server >/dev/null || need+=(redis-server)
command -v iptables >/dev/null || need+=(iptables)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  need+=(postgresql)
fi
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
command -v python3 >/dev/null || need+=(python3)
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v dockerd >/dev/null || die "dockerd is still missing after installing docker.io"
# tinyproxy: the forward proxy of egress-allowlist sessions (the gateway runs one per session;
# the package's own service is kept from starting).
if ! command -v tinyproxy >/dev/null; then
  log "installing tinyproxy"
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends tinyproxy >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq --no-install-recommends tinyproxy >/dev/null; }
  rm -f /usr/sbin/policy-rc.d
fi
command -v tinyproxy >/dev/null || die "tinyproxy is still missing after installing it"

# --- gVisor (optional): CCGATE_SETUP_GVISOR=1 installs runsc and registers it with Docker ---
if [ "${CCGATE_SETUP_GVISOR:-0}" = "1" ]; then
  if ! command -v runsc >/dev/null; then
    log "installing runsc (gVisor)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -qq --no-install-recommends runsc >/dev/null \
      || { apt-get update -qq && apt-get install -y -qq --no-install-recommends runsc >/dev/null; }
  fi
  # Register the runtime in daemon.json (merged, other settings kept); a running engine
  # without it is restarted (on a fresh machine nothing runs yet). Debian's runsc
  # (2022-12) mistakes Docker's network namespace for the root one on newer kernels ("cannot
  # run with network enabled in root network namespace"), so it runs with --network=host:
  # gVisor then uses the kernel's network stack *inside the container's own namespace* (the
  # sessions network and the host firewall apply as under runc); every other syscall still
  # goes to gVisor's kernel.
  mkdir -p /etc/docker
  python3 - <<'PY'
import json, pathlib
path = pathlib.Path("/etc/docker/daemon.json")
config = json.loads(path.read_text()) if path.exists() and path.read_text().strip() else {}
config.setdefault("runtimes", {})["runsc"] = {
    "path": "/usr/bin/runsc",
    "runtimeArgs": ["--network=host"],
}
path.write_text(json.dumps(config, indent=2) + "\n")
PY
  if docker info >/dev/null 2>&1 \
    && ! docker info --format '{{json .Runtimes}}' | grep -q 'runsc.*network=host'; then
    log "restarting dockerd to register runsc"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
      systemctl restart docker
    else
      pkill -x dockerd || true
      for _ in $(seq 1 60); do pgrep -x dockerd >/dev/null || break; sleep 0.5; done
    fi
  fi
fi

# --- Docker engine ----------------------------------------------------------------------
if ! docker info >/dev/null 2>&1; then
  if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
    systemctl start docker || true
  fi
fi
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd (log: /var/log/ccgate-dockerd.log)"
  nohup dockerd >/var/log/ccgate-dockerd.log 2>&1 &
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
fi
docker info >/dev/null 2>&1 || die "the Docker engine did not start; see /var/log/ccgate-dockerd.log"

# --- Python environment -----------------------------------------------------------------
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python >= 3.11 is required (found $(python3 --version))"
stamp=.venv/.ccgate-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing ccgate into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi

# --- Session image, and the test services' images (testcontainers) -----------------------
bash scripts/build-image.sh --test-services
log "ready"
