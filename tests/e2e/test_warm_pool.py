"""Warm pool: pooled claims serve sessions like cold starts; misses start cold; the pool
refills, heals and respects limits (real Docker, the real CLI, scripted model)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from websockets.asyncio.client import connect

from gateway.config import PoolProfile
from scripted_model import ScriptedModelServer
from tests.conftest import Api, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.e2e.helpers import collect_until
from tests.servers import GatewayServer, RedisServer

pytestmark = pytest.mark.e2e

POOL = "ccgate.pool"


def _remove_pool(client: docker.DockerClient, deployment: str) -> None:
    """Remove what the deployment's pools hold (a stopped gateway leaves its pool containers
    for the next process to claim; a test's deployment ends with it)."""
    labels = {"label": [POOL, f"ccgate.deployment={deployment}"]}
    # Sparse: no per-container inspect, which races with removals still under way.
    for container in client.containers.list(all=True, filters=labels, sparse=True):
        try:
            container.remove(force=True)
        except docker.errors.NotFound:
            pass
        except docker.errors.APIError as exc:  # the gateway is removing it already
            if exc.status_code != 409:
                raise
    for volume in client.volumes.list(filters=labels):
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            volume.remove(force=True)


@pytest.fixture(scope="module")
def pool_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> Iterator[GatewayServer]:
    """A pool of 2 (up to 4 while claims are frequent) of the default config; its own SQLite
    database, so its own deployment."""
    settings = full_stack_settings(
        Path(tmp_path_factory.mktemp("gw-pool")),
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        database_url=None,
        warm_pool=[PoolProfile(name="default", min_size=2, max_size=4)],
    )
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()
    _remove_pool(docker_client, settings.deployment_id)


@pytest.fixture
async def api(pool_gateway: GatewayServer) -> AsyncIterator[Api]:
    made = Api(pool_gateway, f"test-{uuid.uuid4().hex[:8]}")
    yield made
    listing = (await made.http.get("/api/v1/sessions", params={"limit": 500})).json()
    for session in listing["sessions"]:
        await made.http.delete(f"/api/v1/sessions/{session['session_id']}")
    await made.http.aclose()


async def metric(api: Api, name: str, **labels: str) -> float:
    """One sample of /metrics (0 when absent)."""
    text = (await api.http.get("/metrics")).text
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:\{{(.*)\}})? (\S+)$", line)
        if m and ",".join(sorted((m.group(1) or "").split(","))) == want:
            return float(m.group(2))
    return 0.0


async def pool_ready(api: Api, at_least: int, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while await metric(api, "ccgate_pool_containers", profile="default", status="ready") < (
        at_least
    ):
        assert time.monotonic() < deadline, f"the pool never had {at_least} ready containers"
        await asyncio.sleep(0.25)


async def ready_event(api: Api, sid: str) -> dict[str, Any]:
    async with connect(api.stream_url(sid)) as ws:
        events = await collect_until(ws, lambda e: e["type"] == "ready", timeout_s=60)
    return dict(events[-1]["data"])


async def chat(api: Api, sid: str, prompt: str) -> dict[str, Any]:
    r = await api.http.post(
        f"/api/v1/sessions/{sid}/chat", json={"prompt": prompt, "stream": False}
    )
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


async def test_a_pooled_claim_is_a_session_like_a_cold_one(
    api: Api, pool_gateway: GatewayServer, docker_client: docker.DockerClient
) -> None:
    await pool_ready(api, 2)
    claims_before = await metric(api, "ccgate_pool_claims_total", profile="default")
    r = await api.http.post("/api/v1/sessions", json={"config": {"timeout_seconds": 120}})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    ready = await ready_event(api, sid)
    assert ready["pooled"] is True and ready["claim_ms"] < 1000, ready
    assert ready["cli_session_id"] == sid
    assert await metric(api, "ccgate_pool_claims_total", profile="default") == claims_before + 1
    container = docker_client.containers.get(f"ccgate-{sid}")
    assert container.labels[POOL] == "default"
    assert container.attrs["HostConfig"]["ReadonlyRootfs"] is True
    # Config applied (the per-session timeout travels in the claim), memory across turns,
    # files become artifacts, another user cannot see it.
    session = (await api.http.get(f"/api/v1/sessions/{sid}")).json()
    assert session["config"]["timeout_seconds"] == 120
    first = await chat(api, sid, "write notes.txt pooled hello")
    assert first["is_error"] is False, first
    recalled = await chat(api, sid, "recall")
    assert "write notes.txt pooled hello" in recalled["result"]
    artifacts = (await api.http.get(f"/api/v1/sessions/{sid}/artifacts")).json()
    assert "notes.txt" in {a["path"] for a in artifacts["artifacts"]}
    stranger = Api(pool_gateway, f"test-{uuid.uuid4().hex[:8]}")
    assert (await stranger.http.get(f"/api/v1/sessions/{sid}")).status_code == 404
    await stranger.http.aclose()
    # A spawn from a pooled session works (its MCP server reads the bound session id).
    spawned = await chat(api, sid, "spawn ephemeral echo from the child")
    assert "Child said: Echo: echo from the child" in spawned["result"], spawned
    # The pool refills behind the claim.
    await pool_ready(api, 2)


async def test_a_create_matching_no_profile_starts_cold(api: Api) -> None:
    misses = await metric(api, "ccgate_pool_misses_total", reason="no_profile")
    r = await api.http.post("/api/v1/sessions", json={"config": {"model": "claude-opus-4-1"}})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    ready = await ready_event(api, sid)
    assert "pooled" not in ready
    assert ready["model"] == "claude-opus-4-1"
    assert await metric(api, "ccgate_pool_misses_total", reason="no_profile") == misses + 1
    answer = await chat(api, sid, "echo cold")
    assert answer["result"] == "Echo: echo cold"


async def test_an_emptied_pool_starts_cold_and_refills(api: Api) -> None:
    await pool_ready(api, 2)
    empty = await metric(api, "ccgate_pool_misses_total", reason="empty")
    responses = await asyncio.gather(
        *(api.http.post("/api/v1/sessions", json={}) for _ in range(5))
    )
    assert [r.status_code for r in responses] == [201] * 5, [r.text for r in responses]
    readies = await asyncio.gather(*(ready_event(api, r.json()["session_id"]) for r in responses))
    pooled = sum(1 for e in readies if e.get("pooled"))
    assert 2 <= pooled <= 4, readies  # a refill may finish during the burst
    assert await metric(api, "ccgate_pool_misses_total", reason="empty") >= empty + 5 - pooled
    for r in responses:
        answer = await chat(api, r.json()["session_id"], "echo after the burst")
        assert answer["result"] == "Echo: echo after the burst"
    # Claims were frequent: the pool grows towards max_size (4).
    await pool_ready(api, 3)


async def test_a_dead_pool_container_is_never_handed_out(
    api: Api, pool_gateway: GatewayServer, docker_client: docker.DockerClient
) -> None:
    await pool_ready(api, 2)
    deployment = pool_gateway.settings.deployment_id
    pooled = docker_client.containers.list(
        filters={"label": [POOL, f"ccgate.deployment={deployment}"]}, sparse=True
    )
    for container in pooled:
        container.kill()
    dead = await metric(api, "ccgate_pool_misses_total", reason="dead")
    r = await api.http.post("/api/v1/sessions", json={})
    assert r.status_code == 201, r.text
    sid = r.json()["session_id"]
    answer = await chat(api, sid, "echo survived")
    assert answer["result"] == "Echo: echo survived"
    ready = await ready_event(api, sid)
    claimed_dead = await metric(api, "ccgate_pool_misses_total", reason="dead") > dead
    # Either the reconciler removed the dead ones first (the create started cold after an
    # empty pool), or the claim found a dead container and fell back to cold.
    assert "pooled" not in ready or not claimed_dead
    await pool_ready(api, 2)
    alive = {
        c.id
        for c in docker_client.containers.list(
            filters={"label": [POOL, f"ccgate.deployment={deployment}"]}, sparse=True
        )
    }
    assert not alive & {c.id for c in pooled}


async def test_a_hung_pool_container_is_given_up_and_the_session_starts_cold(
    api: Api, pool_gateway: GatewayServer, docker_client: docker.DockerClient
) -> None:
    """A frozen container (``docker pause``: alive to Docker, deaf to its claim) is claimed,
    does not take the claim in 3 s, is removed, and the create still succeeds — cold."""
    await pool_ready(api, 2)
    deployment = pool_gateway.settings.deployment_id
    frozen = docker_client.containers.list(
        filters={"label": [POOL, f"ccgate.deployment={deployment}"]}, sparse=True
    )
    for container in frozen:
        container.pause()
    dead = await metric(api, "ccgate_pool_misses_total", reason="dead")
    started = time.monotonic()
    r = await api.http.post("/api/v1/sessions", json={})
    assert r.status_code == 201, r.text
    assert time.monotonic() - started > 2.5  # it waited for the claim, then started cold
    sid = r.json()["session_id"]
    ready = await ready_event(api, sid)
    assert "pooled" not in ready, ready
    assert await metric(api, "ccgate_pool_misses_total", reason="dead") == dead + 1
    assert (await chat(api, sid, "echo thawed"))["result"] == "Echo: echo thawed"
    # Both frozen containers are gone (the claimed one with its claim, the other as dead).
    deadline = time.monotonic() + 30
    while True:
        listed = docker_client.containers.list(all=True, sparse=True)
        left = {c.id for c in listed} & {c.id for c in frozen}
        if not left:
            break
        assert time.monotonic() < deadline, f"frozen pool containers left: {left}"
        await asyncio.sleep(0.5)
    await pool_ready(api, 2)


async def test_pool_containers_count_against_the_live_limit(
    tmp_path: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> None:
    """max_live_sessions=3 with a pool of 5: three containers at most, pooled or not; a claim
    keeps the total; a gateway restart re-adopts the ready ones."""
    settings = full_stack_settings(
        tmp_path,
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        database_url=None,
        max_live_sessions=3,
        warm_pool=[PoolProfile(name="default", min_size=5)],
    )
    deployment = settings.deployment_id

    def containers() -> list[Any]:
        """Running containers of the deployment (sparse: no inspect racing a removal)."""
        return list(
            docker_client.containers.list(
                # session and pool containers (network sandboxes are not sessions)
                filters={"label": [f"ccgate.deployment={deployment}", "ccgate.session_id"]},
                sparse=True,
            )
        )

    gateway = GatewayServer(settings).start()
    api = Api(gateway, f"test-{uuid.uuid4().hex[:8]}")
    try:
        await pool_ready(api, 3)
        await asyncio.sleep(2)  # several ticks: nothing more is started
        assert len(containers()) == 3
        sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
        assert (await ready_event(api, sid))["pooled"] is True
        await asyncio.sleep(2)
        assert len(containers()) == 3
        before = {c.id for c in containers() if POOL in c.attrs["Labels"]} - {
            docker_client.containers.get(f"ccgate-{sid}").id
        }
        await api.http.aclose()
        gateway.stop()
        gateway = GatewayServer(settings, port=gateway.port).start()
        api = Api(gateway, api.user)
        other = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
        assert (await ready_event(api, other))["pooled"] is True
        assert docker_client.containers.get(f"ccgate-{other}").id in before
        assert (await chat(api, sid, "echo still here"))["result"] == "Echo: echo still here"
        for s in (sid, other):
            await api.http.delete(f"/api/v1/sessions/{s}")
    finally:
        await api.http.aclose()
        gateway.stop()
        _remove_pool(docker_client, deployment)


async def test_two_replicas_claiming_at_once_never_share_a_container(
    tmp_path: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> None:
    """Two replicas of one deployment (PostgreSQL of its own) and a pool of 6: 12 concurrent
    creates, half through each replica. Every session gets a container of its own, and the
    claims handed out are exactly the pool's."""
    database = postgres_server.new_database()
    replicas: list[GatewayServer] = []
    apis: list[Api] = []
    try:
        for name in ("a", "b"):
            settings = full_stack_settings(
                tmp_path / name,
                redis_server,
                postgres_server,
                s3_server,
                scripted_model,
                database_url=database,
                warm_pool=[PoolProfile(name="default", min_size=6)],
                warm_pool_refill_concurrency=3,
            )
            replicas.append(GatewayServer(settings).start())
        user = f"test-{uuid.uuid4().hex[:8]}"
        apis = [Api(r, user) for r in replicas]
        await pool_ready(apis[0], 6)
        responses = await asyncio.gather(
            *(apis[n % 2].http.post("/api/v1/sessions", json={}) for n in range(12))
        )
        assert [r.status_code for r in responses] == [201] * 12, [r.text for r in responses]
        sids = [r.json()["session_id"] for r in responses]
        readies = await asyncio.gather(*(ready_event(apis[0], sid) for sid in sids))
        assert sum(1 for e in readies if e.get("pooled")) == 6, readies
        ids = [docker_client.containers.get(f"ccgate-{sid}").id for sid in sids]
        assert len(set(ids)) == 12
        answers = await asyncio.gather(*(chat(apis[1], sid, f"echo {sid}") for sid in sids))
        assert [a["result"] for a in answers] == [f"Echo: echo {sid}" for sid in sids]
        for sid in sids:
            await apis[0].http.delete(f"/api/v1/sessions/{sid}")
    finally:
        for api in apis:
            await api.http.aclose()
        for replica in replicas:
            replica.stop()
        if replicas:
            _remove_pool(docker_client, replicas[0].settings.deployment_id)


async def test_after_a_redis_restart_the_pool_serves_again(
    tmp_path: Path,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    docker_client: docker.DockerClient,
) -> None:
    """Redis restarts (its data kept, its ACL users lost): the pool manager re-creates the
    pool containers' Redis users, their wrappers log in again, and a claim still gets an
    initialized container — not a 3 s timeout and a cold start."""
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = RedisServer(data_dir=str(redis_dir)).start()
    settings = full_stack_settings(
        tmp_path / "gw",
        redis,  # type: ignore[arg-type]
        postgres_server,
        s3_server,
        scripted_model,
        database_url=None,
        warm_pool=[PoolProfile(name="default", min_size=2)],
    )
    gateway = GatewayServer(settings).start()
    api = Api(gateway, f"test-{uuid.uuid4().hex[:8]}")
    try:
        await pool_ready(api, 2)
        redis.stop()
        redis = RedisServer(port=redis.port, password=redis.password, data_dir=str(redis_dir))
        redis.start()
        restored = 0
        deadline = time.monotonic() + 30
        while restored < 2:  # the reconcile runs every 5 s
            assert time.monotonic() < deadline, "the pool's ACL users were not re-created"
            users = await asyncio.to_thread(_acl_users, redis)
            restored = sum(1 for u in users if u.startswith("ccgate-session-"))
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # the wrappers' retry loops log in again
        r = await api.http.post("/api/v1/sessions", json={})
        assert r.status_code == 201, r.text
        sid = r.json()["session_id"]
        ready = await ready_event(api, sid)
        assert ready.get("pooled") is True, ready
        assert (await chat(api, sid, "echo after restart"))["result"] == "Echo: echo after restart"
        await api.http.delete(f"/api/v1/sessions/{sid}")
    finally:
        await api.http.aclose()
        gateway.stop()
        redis.stop()
        _remove_pool(docker_client, settings.deployment_id)


def _acl_users(redis: RedisServer) -> list[str]:
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url)
    try:
        return [u if isinstance(u, str) else u.decode() for u in client.acl_users()]
    finally:
        client.close()
