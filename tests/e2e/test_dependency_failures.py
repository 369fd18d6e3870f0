"""A failing dependency gives a 503 that names it, and leaves nothing half-created."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import docker
import httpx
import pytest
import redis

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.conftest import make_settings
from tests.containers import RedisContainer
from tests.servers import GatewayServer, PostgresServer, RedisServer

pytestmark = pytest.mark.e2e


def _client(gateway: GatewayServer, user: str) -> httpx.Client:
    token = mint_token(key=gateway.app.state.jwt_key, user=user, ttl_s=600)
    return httpx.Client(
        base_url=gateway.url, headers={"Authorization": f"Bearer {token}"}, timeout=60
    )


def _session_keys(server: RedisServer | RedisContainer) -> set[bytes]:
    client = redis.Redis.from_url(server.url)
    try:
        return set(client.keys("ccgate:session:*"))
    finally:
        client.close()


def _acl_users(server: RedisServer | RedisContainer) -> set[str]:
    client = redis.Redis.from_url(server.url)
    try:
        return set(client.acl_users())
    finally:
        client.close()


def _leftover_volumes(client: docker.DockerClient, owner: str) -> list[str]:
    return [v.name for v in client.volumes.list(filters={"label": f"ccgate.owner={owner}"})]


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Iterator[list[GatewayServer]]:
    started: list[GatewayServer] = []
    yield started
    for gateway in started:
        gateway.stop()


def test_missing_image_is_503_naming_docker_and_leaves_nothing(
    tmp_path: Path,
    redis_server: RedisContainer,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
    gateway_factory: list[GatewayServer],
) -> None:
    gateway = GatewayServer(
        make_settings(tmp_path, redis_url=redis_server.url, image="ccgate-no-such-image:0")
    ).start()
    gateway_factory.append(gateway)
    keys_before, users_before = _session_keys(redis_server), _acl_users(redis_server)
    with _client(gateway, "test-noimage") as http:
        r = http.post("/api/v1/sessions", json={})
        assert r.status_code == 503
        assert r.json()["code"] == "container_start_failed"
        assert "docker" in r.json()["detail"] and "build-image" in r.json()["detail"]
        assert http.get("/api/v1/sessions").json()["total"] == 0
    assert _leftover_volumes(docker_client, "test-noimage") == []
    assert _session_keys(redis_server) == keys_before
    assert _acl_users(redis_server) == users_before


def test_unreachable_docker_is_503_naming_docker(
    tmp_path: Path, redis_server: RedisContainer, gateway_factory: list[GatewayServer]
) -> None:
    gateway = GatewayServer(
        make_settings(
            tmp_path, redis_url=redis_server.url, docker_host="unix:///tmp/no-docker-here.sock"
        )
    ).start()
    gateway_factory.append(gateway)
    keys_before = _session_keys(redis_server)
    with _client(gateway, "test-nodocker") as http:
        r = http.post("/api/v1/sessions", json={})
        assert r.status_code == 503
        assert r.json()["detail"].startswith("docker is unavailable")
        assert http.get("/api/v1/sessions").json()["total"] == 0
        health = http.get("/health")
        assert health.status_code == 503
        assert health.json()["checks"]["docker"]["ok"] is False
        assert health.json()["components"]["docker"] == "unhealthy"
        assert health.json()["checks"]["redis"]["ok"] is True
    assert _session_keys(redis_server) == keys_before


def test_redis_down_is_503_naming_redis_and_leaves_nothing(
    tmp_path: Path, docker_client: docker.DockerClient, gateway_factory: list[GatewayServer]
) -> None:
    own_redis = RedisServer().start()
    gateway = GatewayServer(make_settings(tmp_path, redis_url=own_redis.url)).start()
    gateway_factory.append(gateway)
    own_redis.stop()
    with _client(gateway, "test-noredis") as http:
        r = http.post("/api/v1/sessions", json={})
        assert r.status_code == 503
        assert r.json()["detail"].startswith("redis is unavailable")
        assert http.get("/api/v1/sessions").json()["total"] == 0
        health = http.get("/health").json()
        assert health["status"] == "unhealthy" and health["checks"]["redis"]["ok"] is False
    assert _leftover_volumes(docker_client, "test-noredis") == []


def test_database_down_is_503_naming_the_database(
    tmp_path: Path, redis_server: RedisContainer, gateway_factory: list[GatewayServer]
) -> None:
    own_pg = PostgresServer().start()
    gateway = GatewayServer(
        make_settings(tmp_path, redis_url=redis_server.url, database_url=own_pg.url)
    ).start()
    gateway_factory.append(gateway)
    own_pg.stop()
    keys_before = _session_keys(redis_server)
    with _client(gateway, "test-nodb") as http:
        r = http.post("/api/v1/sessions", json={})
        assert r.status_code == 503
        assert r.json()["detail"].startswith("database is unavailable")
        # A prompt (the owner's one-statement path first) is an outage too, not a bug.
        r = http.post(f"/api/v1/sessions/{uuid.uuid4()}/chat", json={"prompt": "hi"})
        assert r.status_code == 503, r.text
        assert r.json()["detail"].startswith("database is unavailable"), r.text
        assert http.get("/health").json()["checks"]["database"]["ok"] is False
    assert _session_keys(redis_server) == keys_before
