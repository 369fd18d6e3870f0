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
    assert env["CCGATE_DOCKER_NETWORK"] == _compose()["networks"]["sessions"]["name"]


def test_only_the_gateway_gets_the_docker_socket_and_redis_joins_the_sessions_network() -> None:
    services = _compose()["services"]
    assert "/var/run/docker.sock:/var/run/docker.sock" in services["gateway"]["volumes"]
    for name in ("redis", "postgres", "minio"):
        assert not any("docker.sock" in v for v in services[name].get("volumes", []))
    assert "sessions" in services["redis"]["networks"]
    assert "networks" not in services["postgres"] and "networks" not in services["minio"]


def test_the_sessions_network_keeps_session_containers_apart() -> None:
    sessions = _compose()["networks"]["sessions"]
    assert sessions["driver_opts"]["com.docker.network.bridge.enable_icc"] == "false"
