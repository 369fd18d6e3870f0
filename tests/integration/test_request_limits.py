"""Request limits on a real gateway and Redis: body size (413), per-user rate (429 +
Retry-After, shared through Redis, on HTTP and WebSocket), and a limiter whose Redis is down."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from gateway.auth import mint_token
from gateway.metrics import Metrics
from gateway.services.ratelimit import UserRateLimiter
from scripted_model import ScriptedModelServer
from tests.conftest import JWT_SECRET, full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.servers import GatewayServer, free_port

LIMIT_BYTES = 256 * 1024


@pytest.fixture(scope="module")
def limited_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
) -> Iterator[GatewayServer]:
    settings = full_stack_settings(
        tmp_path_factory.mktemp("gw-limits"),
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        rate_limit="5/second",
        max_request_bytes=LIMIT_BYTES,
    )
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()


def _headers(user: str) -> dict[str, str]:
    token = mint_token(key=JWT_SECRET, user=user, ttl_s=600)
    return {"Authorization": f"Bearer {token}"}


async def test_a_body_over_the_limit_is_413_declared_or_chunked(
    limited_gateway: GatewayServer,
) -> None:
    big = json.dumps({"prompt": "x" * (LIMIT_BYTES + 1)}).encode()
    async with httpx.AsyncClient(base_url=limited_gateway.url, timeout=30) as http:
        r = await http.post(
            "/api/v1/sessions",
            content=big,
            headers=_headers("test-big-1") | {"content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["code"] == "request_too_large"

        async def chunks() -> object:
            for i in range(0, len(big), 65536):
                yield big[i : i + 65536]

        r = await http.post("/api/v1/sessions", content=chunks(), headers=_headers("test-big-2"))
        assert r.status_code == 413 and "CCGATE_MAX_REQUEST_BYTES" in r.json()["detail"]
        # Below the limit the same route answers as usual (a validation error here).
        r = await http.post("/api/v1/sessions", json={"nope": 1}, headers=_headers("test-big-3"))
        assert r.status_code == 422


async def test_the_rate_limit_is_per_user_with_retry_after(
    limited_gateway: GatewayServer,
) -> None:
    async with httpx.AsyncClient(base_url=limited_gateway.url, timeout=30) as http:
        alice, bob = _headers("test-rate-alice"), _headers("test-rate-bob")
        statuses = [
            (await http.get("/api/v1/sessions", headers=alice)).status_code for _ in range(5)
        ]
        assert statuses == [200] * 5
        over = await http.get("/api/v1/sessions", headers=alice)
        assert over.status_code == 429 and over.json()["code"] == "rate_limited"
        assert "5 requests per 1 second" in over.json()["detail"]
        retry = int(over.headers["retry-after"])
        assert 1 <= retry <= 2
        assert (await http.get("/api/v1/sessions", headers=bob)).status_code == 200
        await asyncio.sleep(retry + 0.1)
        assert (await http.get("/api/v1/sessions", headers=alice)).status_code == 200
        metrics = (await http.get("/metrics")).text
        assert "ccgate_rate_limited_total 1.0" in metrics


async def test_a_websocket_over_the_limit_is_closed_to_try_later(
    limited_gateway: GatewayServer,
) -> None:
    token = mint_token(key=JWT_SECRET, user="test-rate-ws", ttl_s=600)
    async with httpx.AsyncClient(base_url=limited_gateway.url, timeout=30) as http:
        for _ in range(5):
            await http.get("/api/v1/sessions", headers=_headers("test-rate-ws"))
    url = f"{limited_gateway.ws_url}/api/v1/sessions/some-session/stream?token={token}"
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(ws.recv(), 10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1013
    assert "rate limit" in closed.value.rcvd.reason


async def test_a_limiter_whose_redis_is_down_lets_requests_through(tmp_path: Path) -> None:
    metrics = Metrics()
    limiter = UserRateLimiter(f"redis://127.0.0.1:{free_port()}/0", "1/minute", metrics)
    for _ in range(3):
        await limiter.hit("test-user")  # no exception although the limit is 1
    assert metrics.rate_limit_errors._value.get() == 3
