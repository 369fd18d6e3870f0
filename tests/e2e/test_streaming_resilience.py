"""Lossless streaming: Redis restarts, replica deaths, trimmed history, many and slow clients."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis as redis_lib
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.conftest import IMAGE, JWT_SECRET, make_settings
from tests.containers import PostgresContainer, RedisContainer
from tests.e2e.helpers import StalledWebSocket
from tests.servers import GatewayProcess, GatewayServer, RedisServer, free_port
from wrapper.protocol import events_key

pytestmark = pytest.mark.e2e

SECRET = JWT_SECRET


def _token(user: str) -> str:
    return mint_token(key=SECRET, user=user, ttl_s=3600)


def _replica_settings(
    redis: RedisServer | RedisContainer,
    postgres: PostgresContainer,
    model: ScriptedModelServer,
    tmp: Path,
    **extra: object,
) -> dict[str, object]:
    return {
        "data_dir": tmp,
        "jwt_secret": SECRET,
        "database_url": postgres.url,
        "redis_url": redis.url,
        "image": IMAGE,
        "anthropic_base_url": f"http://127.0.0.1:{model.port}",
        "anthropic_api_key": "sk-ant-scripted",
        "container_memory": "1g",
        "stop_timeout_s": 5,
        "reaper_interval_s": 1,
        "reaper_grace_s": 5,
        "ledger_claim_idle_s": 2,
        # Hundreds of clients of one user here: the per-user rate limit is not under test.
        "rate_limit": "",
        **extra,
    }


@pytest.fixture
def replicas(
    tmp_path: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    scripted_model: ScriptedModelServer,
    docker_client: Any,
) -> Iterator[list[GatewayProcess]]:
    """Two gateway processes sharing Redis and PostgreSQL. Containers reach the gateway (its
    model proxy and MCP routes) at the second one, as they would reach whichever replica a load
    balancer picks, so the first can be killed without cutting a container off."""
    port_b = free_port()
    made = [
        GatewayProcess(
            _replica_settings(redis_server, postgres_server, scripted_model, tmp_path / f"r{n}")
            | {"container_gateway_url": f"http://host.docker.internal:{port_b}"},
            port=port_b if n == 1 else None,
        ).start()
        for n in range(2)
    ]
    yield made
    for replica in made:
        replica.stop()


async def _events_until(ws: ClientConnection, stop: Any, timeout_s: float = 90) -> list[Any]:
    out: list[dict[str, Any]] = []

    async def read() -> None:
        while True:
            message = json.loads(await ws.recv())
            if "seq" not in message:
                assert message.get("type") != "gap", message
                continue
            out.append(message)
            if stop(message):
                return

    await asyncio.wait_for(read(), timeout_s)
    return out


async def _persisted_seqs(http: httpx.AsyncClient, sid: str, expected_last: int) -> list[int]:
    """Page through GET /events until it holds everything up to ``expected_last``."""
    for _ in range(200):
        seqs: list[int] = []
        after = 0
        while True:
            page = (
                await http.get(f"/api/v1/sessions/{sid}/events", params={"after_seq": after})
            ).json()
            seqs += [e["seq"] for e in page["events"]]
            after = page["next_after_seq"]
            if not page["has_more"]:
                break
        if seqs and seqs[-1] >= expected_last:
            return seqs
        await asyncio.sleep(0.25)
    raise AssertionError("history never complete")


def _completed(mid: str) -> Any:
    return lambda e: e["type"] == "turn_completed" and e["turn_id"] == mid


async def test_a_client_resumes_on_another_replica_after_its_replica_is_killed(
    replicas: list[GatewayProcess],
) -> None:
    a, b = replicas
    user = f"test-{uuid.uuid4().hex[:8]}"
    token = _token(user)
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=a.url, headers=headers, timeout=60) as via_a:
        sid = (
            await via_a.post(
                "/api/v1/sessions", json={"config": {"include_partial_messages": True}}
            )
        ).json()["session_id"]
        url_a = f"{a.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
        async with connect(url_a, max_size=None) as ws:
            mid = (
                await via_a.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 5"})
            ).json()["message_id"]
            first = await _events_until(ws, lambda e: e["type"] == "stream_event")
            await asyncio.to_thread(a.kill)
            with pytest.raises(ConnectionClosed):
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), 10))
                    if "seq" in message:
                        first.append(message)
    last = first[-1]["seq"]
    async with httpx.AsyncClient(base_url=b.url, headers=headers, timeout=60) as via_b:
        url_b = f"{b.ws_url}/api/v1/sessions/{sid}/stream?after_seq={last}&token={token}"
        async with connect(url_b, max_size=None) as ws:
            rest = await _events_until(ws, _completed(mid))
        seqs = [e["seq"] for e in first + rest]
        assert seqs == list(range(1, len(seqs) + 1)), "no gap, no duplicate across replicas"
        persisted = await _persisted_seqs(via_b, sid, seqs[-1])
        assert persisted[: len(seqs)] == seqs  # each event once in the database
        assert (await via_b.delete(f"/api/v1/sessions/{sid}")).status_code == 204


async def test_two_hundred_clients_on_two_replicas_receive_the_identical_sequence(
    replicas: list[GatewayProcess],
) -> None:
    user = f"test-{uuid.uuid4().hex[:8]}"
    token = _token(user)
    headers = {"Authorization": f"Bearer {token}"}
    a, b = replicas
    async with httpx.AsyncClient(base_url=a.url, headers=headers, timeout=60) as http:
        sid = (
            await http.post("/api/v1/sessions", json={"config": {"include_partial_messages": True}})
        ).json()["session_id"]
        urls = [
            f"{r.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
            for r in (a, b)
            for _ in range(100)
        ]
        sockets = await asyncio.gather(*(connect(u, max_size=None) for u in urls))
        try:
            mid = (
                await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "multi"})
            ).json()["message_id"]
            streams = await asyncio.gather(*(_events_until(ws, _completed(mid)) for ws in sockets))
        finally:
            await asyncio.gather(*(ws.close() for ws in sockets))
        digests = {
            hashlib.sha256(json.dumps(events, sort_keys=True).encode()).hexdigest()
            for events in streams
        }
        assert len(digests) == 1
        seqs = [e["seq"] for e in streams[0]]
        assert seqs == list(range(1, len(seqs) + 1))
        await http.delete(f"/api/v1/sessions/{sid}")


async def test_a_redis_restart_mid_turn_loses_and_duplicates_nothing(
    tmp_path: Path,
    postgres_server: PostgresContainer,
    scripted_model: ScriptedModelServer,
    docker_client: Any,
) -> None:
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    redis = RedisServer(data_dir=str(redis_dir)).start()
    gateway = GatewayProcess(
        _replica_settings(redis, postgres_server, scripted_model, tmp_path / "gw")
    ).start()
    user = f"test-{uuid.uuid4().hex[:8]}"
    token = _token(user)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as http:
            sid = (
                await http.post(
                    "/api/v1/sessions", json={"config": {"include_partial_messages": True}}
                )
            ).json()["session_id"]
            url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
            seen: list[dict[str, Any]] = []
            async with connect(url, max_size=None) as ws:
                mid = (
                    await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 6"})
                ).json()["message_id"]
                seen += await _events_until(ws, lambda e: e["type"] == "stream_event")
                redis.stop()  # mid-turn: the CLI keeps streaming, the wrapper keeps its events
                await asyncio.sleep(3)
                redis = RedisServer(
                    port=redis.port, password=redis.password, data_dir=str(redis_dir)
                ).start()
                with pytest.raises((ConnectionClosed, TimeoutError)):
                    while True:
                        message = json.loads(await asyncio.wait_for(ws.recv(), 5))
                        if "seq" in message:
                            seen.append(message)
            for _ in range(60):  # resume by seq until the turn's result has arrived
                if any(_completed(mid)(e) for e in seen):
                    break
                after = seen[-1]["seq"]
                url = (
                    f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?after_seq={after}&token={token}"
                )
                try:
                    async with connect(url, max_size=None) as ws:
                        seen += await _events_until(ws, _completed(mid), timeout_s=30)
                        break
                except (ConnectionClosed, OSError, TimeoutError):
                    await asyncio.sleep(0.5)
            seqs = [e["seq"] for e in seen]
            assert seqs == list(range(1, len(seqs) + 1)), "every event once, in order"
            assert any(e["type"] == "result" and e["turn_id"] == mid for e in seen)
            persisted = await _persisted_seqs(http, sid, seqs[-1])
            assert persisted[: len(seqs)] == seqs and len(set(persisted)) == len(persisted)
            await http.delete(f"/api/v1/sessions/{sid}")
    finally:
        gateway.stop()
        redis.stop()


async def test_resume_from_zero_after_the_stream_was_trimmed_is_served_from_the_database(
    tmp_path: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    scripted_model: ScriptedModelServer,
    docker_client: Any,
) -> None:
    settings = make_settings(
        tmp_path,
        database_url=postgres_server.url,
        redis_url=redis_server.url,
        anthropic_base_url=f"http://127.0.0.1:{scripted_model.port}",
        anthropic_api_key="sk-ant-scripted",
        stream_maxlen=10,
    )
    gateway = GatewayServer(settings).start()
    token = mint_token(
        key=gateway.app.state.jwt_key, user=f"test-{uuid.uuid4().hex[:6]}", ttl_s=600
    )
    headers = {"Authorization": f"Bearer {token}"}
    try:
        async with httpx.AsyncClient(base_url=gateway.url, headers=headers, timeout=60) as http:
            sid = (
                await http.post(
                    "/api/v1/sessions", json={"config": {"include_partial_messages": True}}
                )
            ).json()["session_id"]
            r = await http.post(
                f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 4", "stream": False}
            )
            assert r.status_code == 200
            client = redis_lib.Redis.from_url(redis_server.url)
            deadline = time.monotonic() + 10
            while len(retained := client.xrange(events_key(sid))) > 10:
                assert time.monotonic() < deadline, len(retained)  # the ledger trims to the cap
                await asyncio.sleep(0.2)
            client.close()
            assert len(retained) == 10  # once persisted, Redis keeps only the cap
            last = int(retained[-1][0].split(b"-")[0])
            assert last > 25  # far more than Redis keeps
            persisted = await _persisted_seqs(http, sid, last)
            assert persisted == list(range(1, last + 1))
            url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?after_seq=0&token={token}"
            async with connect(url, max_size=None) as ws:
                replay = await _events_until(ws, lambda e: e["seq"] == last)
            assert [e["seq"] for e in replay] == list(range(1, last + 1))

            # The same through Server-Sent Events, resuming with Last-Event-ID.
            sse: list[int] = []
            async with http.stream(
                "GET", f"/api/v1/sessions/{sid}/events/stream", headers={"Last-Event-ID": "5"}
            ) as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    if line.startswith("id: "):
                        sse.append(int(line[4:]))
                        if sse[-1] == last:
                            break
            assert sse == list(range(6, last + 1))
            await http.delete(f"/api/v1/sessions/{sid}")
    finally:
        gateway.stop()


async def test_a_client_that_stops_reading_is_cut_off_and_the_others_keep_pace(
    make_api: Any,
) -> None:
    api = make_api()
    sid = (await api.http.post("/api/v1/sessions", json={})).json()["session_id"]
    stalled = StalledWebSocket(
        "127.0.0.1", api.gateway.port, f"/api/v1/sessions/{sid}/stream?token={api.token}"
    )
    try:
        async with connect(api.stream_url(sid), max_size=None) as reader:
            await asyncio.sleep(0.5)  # both subscribed
            for _ in range(16):  # about 48 MB of events; the reader keeps up with every turn
                mid = (
                    await api.http.post(
                        f"/api/v1/sessions/{sid}/chat", json={"prompt": "big 1500000"}
                    )
                ).json()["message_id"]
                await _events_until(reader, _completed(mid), timeout_s=60)
        received, code = await asyncio.to_thread(stalled.drain)
    finally:
        stalled.close()
    assert code == 4429  # after what was already buffered, the documented close code
    assert received < 16 * 5  # cut off long before the end of the 16 turns
    hub = api.gateway.app.state.sessions.hub
    assert hub.channel_count == 0  # its buffer is gone with it
