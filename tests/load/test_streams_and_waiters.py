"""Load: many open streams and pending waits on one session must not starve the gateway.

One real gateway process (``ccgate serve``), real Redis, SQLite (the embedded default) and
PostgreSQL, a real container running a long scripted turn. 150 SSE streams, 150 WebSocket
clients and 60 pending ``POST /wait`` calls hold no database connection while they wait, so
other requests keep being served, a new session can be created, and every waiter gets the
result. Latencies are printed (targets live in the benchmarks, not here).
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from gateway.auth import mint_token
from scripted_model import ScriptedModelServer
from tests.conftest import IMAGE, JWT_SECRET
from tests.containers import PostgresContainer, RedisContainer
from tests.servers import GatewayProcess

pytestmark = pytest.mark.e2e

SSE_CLIENTS, WS_CLIENTS, WAITERS = 150, 150, 60


def _settings(
    db: str,
    tmp: Path,
    redis: RedisContainer,
    postgres: PostgresContainer,
    model: ScriptedModelServer,
) -> dict[str, object]:
    values: dict[str, object] = {
        "data_dir": tmp,
        "jwt_secret": JWT_SECRET,
        "redis_url": redis.url,
        "image": IMAGE,
        "anthropic_base_url": f"http://127.0.0.1:{model.port}",
        "anthropic_api_key": "sk-ant-scripted",
        "container_memory": "1g",
        "stop_timeout_s": 5,
        "rate_limit": "",  # one user's hundreds of streams and waiters are the load here
    }
    if db == "postgresql":
        values["database_url"] = postgres.url
    return values


async def _sse(client: httpx.AsyncClient, sid: str, opened: asyncio.Event, n: list[int]) -> None:
    async with client.stream("GET", f"/api/v1/sessions/{sid}/events/stream") as response:
        assert response.status_code == 200
        n[0] += 1
        if n[0] == SSE_CLIENTS:
            opened.set()
        async for _ in response.aiter_raw():
            pass


async def _ws(url: str, opened: asyncio.Event, n: list[int]) -> None:
    async with connect(url, max_size=None, open_timeout=60) as ws:
        n[0] += 1
        if n[0] == WS_CLIENTS:
            opened.set()
        async for _ in ws:
            pass


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
async def test_streams_and_waiters_hold_no_database_connection(
    db: str,
    tmp_path: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    scripted_model: ScriptedModelServer,
    docker_client: Any,
) -> None:
    gateway = GatewayProcess(
        _settings(db, tmp_path / "gw", redis_server, postgres_server, scripted_model)
    ).start()
    user = f"test-{uuid.uuid4().hex[:8]}"
    token = mint_token(key=JWT_SECRET, user=user, ttl_s=3600)
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    headers = {"Authorization": f"Bearer {token}"}
    tasks: list[asyncio.Task[Any]] = []
    sids: list[str] = []
    try:
        async with (
            httpx.AsyncClient(
                base_url=gateway.url, headers=headers, timeout=120, limits=limits
            ) as http,
            httpx.AsyncClient(
                base_url=gateway.url, headers=headers, timeout=None, limits=limits
            ) as streams,
        ):
            created = await http.post("/api/v1/sessions", json={})
            assert created.status_code == 201, created.text
            sid = created.json()["session_id"]
            sids.append(sid)
            chat = await http.post(f"/api/v1/sessions/{sid}/chat", json={"prompt": "slow 12"})
            assert chat.status_code == 202, chat.text
            opened, sse_count = asyncio.Event(), [0]
            ws_opened, ws_count = asyncio.Event(), [0]
            tasks += [
                asyncio.create_task(_sse(streams, sid, opened, sse_count))
                for _ in range(SSE_CLIENTS)
            ]
            url = f"{gateway.ws_url}/api/v1/sessions/{sid}/stream?token={token}"
            tasks += [asyncio.create_task(_ws(url, ws_opened, ws_count)) for _ in range(WS_CLIENTS)]
            waits = [
                asyncio.create_task(
                    http.post(f"/api/v1/sessions/{sid}/wait", json={"timeout_seconds": 90})
                )
                for _ in range(WAITERS)
            ]
            await asyncio.wait_for(opened.wait(), 60)
            await asyncio.wait_for(ws_opened.wait(), 60)
            latencies: list[float] = []
            for _ in range(100):
                started = time.perf_counter()
                response = await http.get(f"/api/v1/sessions/{sid}")
                latencies.append((time.perf_counter() - started) * 1000)
                assert response.status_code == 200, response.text
            other = await http.post("/api/v1/sessions", json={})
            assert other.status_code == 201, other.text
            sids.append(other.json()["session_id"])
            results = await asyncio.gather(*waits)
            assert all(r.status_code == 200 for r in results), [r.text for r in results[:3]]
            assert {r.json()["message_id"] for r in results} == {chat.json()["message_id"]}
            assert all(r.json()["status"] == "completed" for r in results)
            latencies.sort()
            print(
                f"\n[{db}] GET /sessions/{{id}} under {SSE_CLIENTS} SSE + {WS_CLIENTS} WS + "
                f"{WAITERS} waiters: p50 {statistics.median(latencies):.1f} ms, "
                f"p99 {latencies[98]:.1f} ms"
            )
            for sid_ in sids:
                await http.delete(f"/api/v1/sessions/{sid_}")
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)
        gateway.stop()
