"""docker-compose.yml describes a production deployment that matches the gateway's settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from gateway.config import Settings

ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def test_compose_runs_gateway_redis_postgres_and_minio() -> None:
    services = _compose()["services"]
    assert set(services) == {"gateway", "redis", "postgres", "minio"}
    assert services["minio"]["image"].startswith("minio/minio")
    assert services["postgres"]["image"].startswith("postgres:")
    assert services["redis"]["image"].startswith("redis:")
    assert (ROOT / services["gateway"]["build"]["dockerfile"]).exists()
    for name in ("redis", "postgres", "minio"):
        assert services["gateway"]["depends_on"][name]["condition"] == "service_healthy"
        assert "healthcheck" in services[name]


def test_gateway_environment_is_understood_by_settings() -> None:
    env = _compose()["services"]["gateway"]["environment"]
    known = {f.upper() for f in Settings.model_fields}
    for name in env:
        bare = name.removeprefix("CCGATE_")
        assert name in ("DATABASE_URL", "REDIS_URL") or bare in known, name
    assert env["DATABASE_URL"].startswith("postgresql://")
    assert env["CCGATE_ENVIRONMENT"] == "production"
    assert env["CCGATE_SESSIONS_FIREWALL"] == "on"  # no session starts without the firewall
    literal = {k.removeprefix("CCGATE_").lower(): v for k, v in env.items() if "$" not in v}
    Settings(**literal, jwt_secret="s" * 48)  # every literal value validates


def test_only_the_gateway_gets_the_docker_socket_and_the_host_network() -> None:
    services = _compose()["services"]
    gateway = services["gateway"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in gateway["volumes"]
    # The host's network namespace and NET_ADMIN: the gateway makes the sessions network and
    # its host firewall, and session containers reach it at host.docker.internal.
    assert gateway["network_mode"] == "host" and gateway["cap_add"] == ["NET_ADMIN"]
    for name in ("redis", "postgres", "minio"):
        assert not any("docker.sock" in v for v in services[name].get("volumes", []))
        assert "network_mode" not in services[name] and "cap_add" not in services[name]


def test_only_redis_is_published_beyond_the_hosts_loopback() -> None:
    services = _compose()["services"]
    assert services["redis"]["ports"] == ["6379:6379"]  # session containers log in here
    for name in ("postgres", "minio"):
        assert all(p.startswith("127.0.0.1:") for p in services[name]["ports"])
    assert "networks" not in _compose()  # the gateway makes the sessions network itself
