"""Shared fixtures: real servers once per run, gateways, users with tokens, Docker cleanup."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from gateway.auth import mint_token
from gateway.config import Settings
from scripted_model import ScriptedModelServer
from tests.containers import (
    PostgresContainer,
    RedisContainer,
    S3Container,
    remove_leftovers,
    require_images,
)
from tests.servers import GatewayServer

IMAGE = "ccgate-session:latest"
JWT_SECRET = secrets.token_urlsafe(32)
"""Shared by every test gateway: they share Redis and the database, like replicas, and replicas
must share their secret (it signs session tokens and derives Redis ACL passwords)."""


@pytest.fixture(scope="session")
def service_containers() -> Iterator[None]:
    """Before the shared servers start: their images exist, and what a killed run left is gone."""
    require_images()
    remove_leftovers()
    yield
    remove_leftovers(own=True)


@pytest.fixture(scope="session")
def redis_server(service_containers: None) -> Iterator[RedisContainer]:
    """A real Redis (container, through testcontainers) for the whole run."""
    server = RedisContainer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres_server(service_containers: None) -> Iterator[PostgresContainer]:
    """A real PostgreSQL (container, through testcontainers) for the whole run."""
    server = PostgresContainer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(service_containers: None) -> Iterator[S3Container]:
    """A real S3-compatible server (moto in a container, through testcontainers)."""
    server = S3Container().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def scripted_model() -> Iterator[ScriptedModelServer]:
    """The scripted Messages API, reachable from containers (binds 0.0.0.0)."""
    server = ScriptedModelServer(host="0.0.0.0", port=0).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """The Docker engine; fails loudly when it or the session image is missing."""
    client = docker.from_env()
    try:
        client.ping()
    except Exception as exc:
        raise RuntimeError("no Docker engine: run scripts/setup.sh (starts dockerd)") from exc
    try:
        client.images.get(IMAGE)
    except docker.errors.ImageNotFound as exc:
        raise RuntimeError(f"{IMAGE} is missing: run scripts/build-image.sh") from exc
    yield client
    client.close()


def make_settings(tmp: Path, **overrides: Any) -> Settings:
    """Gateway settings isolated in ``tmp``."""
    base: dict[str, Any] = {
        "data_dir": tmp,
        "jwt_secret": JWT_SECRET,
        "stop_timeout_s": 5,
        "image": IMAGE,
        # No background containers in gateways that start none (full_stack_settings: the
        # default, as deployed).
        "network_sandboxes": 0,
    }
    base.update(overrides)
    return Settings(**base)


def full_stack_settings(
    tmp: Path,
    redis: RedisContainer,
    postgres: PostgresContainer,
    s3: S3Container,
    model: ScriptedModelServer,
    **overrides: Any,
) -> Settings:
    """Settings for a gateway on every real dependency, with fast reaper sweeps for tests."""
    values: dict[str, Any] = {
        "database_url": postgres.url,
        "redis_url": redis.url,
        "s3_endpoint": s3.endpoint,
        "s3_access_key": s3.access_key,
        "s3_secret_key": s3.secret_key,
        "anthropic_base_url": f"http://127.0.0.1:{model.port}",
        "anthropic_api_key": "sk-ant-scripted",
        "container_memory": "1g",
        "reaper_interval_s": 1.0,
        "reaper_grace_s": 3.0,
        "network_sandboxes": Settings.model_fields["network_sandboxes"].default,
        # The tests' callback receivers listen on loopback; every gateway sharing a ledger group
        # must allow them (any replica may deliver a child's result).
        "callback_allowed_networks": ["127.0.0.0/8"],
    }
    return make_settings(tmp, **(values | overrides))


class Api:
    """An httpx client logged in as one user."""

    def __init__(self, gateway: GatewayServer, user: str) -> None:
        self.user = user
        self.token = mint_token(key=gateway.app.state.jwt_key, user=user, ttl_s=3600)
        self.gateway = gateway
        self.http = httpx.AsyncClient(
            base_url=gateway.url,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=120,
        )

    def stream_url(self, session_id: str, after_seq: int = 0) -> str:
        """WebSocket URL of a session's stream (token in the query)."""
        return (
            f"{self.gateway.ws_url}/api/v1/sessions/{session_id}/stream"
            f"?after_seq={after_seq}&token={self.token}"
        )


@pytest.fixture(scope="session")
def e2e_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> Iterator[GatewayServer]:
    """The gateway on PostgreSQL + S3 + Redis + Docker with the scripted model."""
    settings = full_stack_settings(
        tmp_path_factory.mktemp("gw-e2e"), redis_server, postgres_server, s3_server, scripted_model
    )
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()
    _remove_test_containers(docker_client)


def _remove_test_containers(client: docker.DockerClient) -> None:
    """Remove whatever a failed test left behind (owners of test users start with 'test-')."""
    for container in client.containers.list(all=True, filters={"label": "ccgate.managed"}):
        if container.labels.get("ccgate.owner", "").startswith("test-"):
            container.remove(force=True)
    for volume in client.volumes.list(filters={"label": "ccgate.owner"}):
        if volume.attrs.get("Labels", {}).get("ccgate.owner", "").startswith("test-"):
            volume.remove(force=True)


@pytest.fixture
async def make_api(e2e_gateway: GatewayServer) -> AsyncIterator[Callable[[], Api]]:
    """Factory of users (``test-<random>``) logged in to the e2e gateway."""
    made: list[Api] = []

    def _make() -> Api:
        api = Api(e2e_gateway, f"test-{uuid.uuid4().hex[:8]}")
        made.append(api)
        return api

    yield _make
    for api in made:
        listing = await api.http.get("/api/v1/sessions", params={"limit": 500})
        for session in listing.json().get("sessions", []):
            await api.http.delete(f"/api/v1/sessions/{session['session_id']}")
        await api.http.aclose()


@pytest.fixture(autouse=True)
async def no_leftover_tasks() -> AsyncIterator[None]:
    """Every test ends the asyncio tasks it started: leftovers are cancelled after the test and
    must end within 10 s; one that does not fails the test with its stack (it would otherwise
    hang the run when the session's loop closes)."""
    import asyncio
    import io

    before = asyncio.all_tasks()
    yield
    left = asyncio.all_tasks() - before - {asyncio.current_task()}
    left = {t for t in left if not t.done()}
    for task in left:
        task.cancel()
    if left:
        _, pending = await asyncio.wait(left, timeout=10)
        if pending:
            stacks = io.StringIO()
            for task in pending:
                task.print_stack(file=stacks)
            pytest.fail(f"tasks that ignore cancellation:\n{stacks.getvalue()}")
