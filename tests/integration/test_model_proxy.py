"""The model proxy on real servers: the gateway (PostgreSQL, Redis) forwarding to the scripted
model over HTTP, with sessions whose credentials are made the way provisioning makes them."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.engine import make_db_factory, make_engine
from gateway.db.models import (
    ModelRequest,
    Session,
    SessionStatus,
    SpawnTree,
    Turn,
    TurnStatus,
    UsageDay,
)
from gateway.services.metering.budgets import utc_day
from gateway.services.metering.credentials import new_proxy_key
from gateway.services.tree import end_session
from scripted_model import ScriptedModelServer
from tests.conftest import full_stack_settings
from tests.containers import PostgresContainer, RedisContainer, S3Container
from tests.servers import GatewayServer, free_port

UPSTREAM_KEY = "sk-ant-scripted"


@pytest.fixture(scope="module")
def proxy_gateway(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
) -> Iterator[GatewayServer]:
    settings = full_stack_settings(
        tmp_path_factory.mktemp("gw-proxy"),
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        anthropic_api_key=UPSTREAM_KEY,
    )
    gateway = GatewayServer(settings).start()
    yield gateway
    gateway.stop()


@pytest.fixture
async def db_factory(
    proxy_gateway: GatewayServer,
) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine: AsyncEngine = make_engine(proxy_gateway.settings.db_url)
    yield make_db_factory(engine)
    await engine.dispose()


async def _session(
    db_factory: async_sessionmaker[AsyncSession],
    *,
    session_budget: float | None = None,
    tree_budget: float | None = None,
    root_id: str | None = None,
    turn: bool = True,
) -> tuple[str, str, str | None]:
    """A live session row with a model credential; returns (session id, key, turn id)."""
    sid = str(uuid.uuid4())
    key, key_hash = new_proxy_key()
    owner = f"test-proxy-{uuid.uuid4().hex[:6]}"
    turn_id = str(uuid.uuid4()) if turn else None
    async with db_factory() as db:
        if root_id is None:
            db.add(SpawnTree(root_id=sid, owner=owner, budget_usd=tree_budget))
        else:
            tree = await db.get(SpawnTree, root_id)
            assert tree is not None
            owner = tree.owner
        db.add(
            Session(
                id=sid,
                owner=owner,
                status=SessionStatus.RUNNING,
                workspace_volume=f"ccgate-ws-{sid}",
                root_id=root_id or sid,
                proxy_key_hash=key_hash,
                budget_usd=session_budget,
            )
        )
        await db.flush()
        if turn_id is not None:
            db.add(Turn(id=turn_id, session_id=sid, prompt="p", status=TurnStatus.RUNNING))
        await db.commit()
    return sid, key, turn_id


async def _requests(db: AsyncSession, sid: str) -> list[ModelRequest]:
    rows = await db.exec(select(ModelRequest).where(col(ModelRequest.session_id) == sid))
    return list(rows.all())


def _body(prompt: str = "hello", *, stream: bool = True) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-4-5",
        "max_tokens": 1024,
        "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
    }


def _events(raw: bytes) -> list[dict[str, Any]]:
    return [json.loads(line[5:]) for line in raw.split(b"\n") if line.startswith(b"data:")]


async def test_a_stream_passes_through_and_is_metered_with_the_upstream_usage(
    proxy_gateway: GatewayServer,
    scripted_model: ScriptedModelServer,
    db_factory: async_sessionmaker[AsyncSession],
) -> None:
    sid, key, turn_id = await _session(db_factory)
    url = proxy_gateway.url + "/model/v1/messages?beta=true"
    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    async with httpx.AsyncClient(timeout=30) as http:
        proxied = await http.post(url, json=_body(), headers=headers)
        direct = await http.post(
            f"http://127.0.0.1:{scripted_model.port}/v1/messages", json=_body()
        )
    assert proxied.status_code == 200, proxied.text
    assert proxied.headers["content-type"].startswith("text/event-stream")
    seen, expected = _events(proxied.content), _events(direct.content)
    assert [e["type"] for e in seen] == [e["type"] for e in expected]
    # The upstream got the deployment's key, never the session's credential.
    upstream = scripted_model.headers[-2]
    assert upstream["x-api-key"] == UPSTREAM_KEY and key not in json.dumps(upstream)
    start = next(e for e in seen if e["type"] == "message_start")["message"]["usage"]
    final = next(e for e in seen if e["type"] == "message_delta")["usage"]
    async with db_factory() as db:
        rows = (
            await db.exec(select(ModelRequest).where(col(ModelRequest.session_id) == sid))
        ).all()
        assert len(rows) == 1
        row = rows[0]
        assert row.turn_id == turn_id and row.stream and row.complete and row.status_code == 200
        assert row.input_tokens == start["input_tokens"]
        assert row.output_tokens == final["output_tokens"]
        expected_cost = (row.input_tokens * 3 + row.output_tokens * 15) / 1_000_000
        assert row.cost_usd == pytest.approx(expected_cost)
        session = await db.get(Session, sid)
        turn = await db.get(Turn, turn_id)
        tree = await db.get(SpawnTree, sid)
        day = await db.get(UsageDay, (session.owner if session else "", utc_day()))
        assert session is not None and turn is not None and tree is not None and day
        assert session.total_cost_usd == pytest.approx(expected_cost)
        assert session.usage["output_tokens"] == row.output_tokens
        assert turn.cost_usd == pytest.approx(expected_cost)
        assert tree.spend_usd == pytest.approx(expected_cost) and tree.reserved_usd == 0
        assert day.requests == 1 and day.spend_usd == pytest.approx(expected_cost)


async def test_json_messages_are_metered_and_other_routes_forwarded_unmetered(
    proxy_gateway: GatewayServer, db_factory: async_sessionmaker[AsyncSession]
) -> None:
    sid, key, _ = await _session(db_factory, turn=False)
    async with httpx.AsyncClient(base_url=proxy_gateway.url + "/model", timeout=30) as http:
        r = await http.post("/v1/messages", json=_body(stream=False), headers={"x-api-key": key})
        assert r.status_code == 200 and r.json()["type"] == "message"
        models = await http.get("/v1/models", headers={"authorization": f"Bearer {key}"})
        assert models.status_code == 200 and models.json()["data"]
        assert (await http.head("/api/hello")).status_code == 200
    async with db_factory() as db:
        rows = (
            await db.exec(select(ModelRequest).where(col(ModelRequest.session_id) == sid))
        ).all()
    assert len(rows) == 1 and not rows[0].stream and rows[0].turn_id is None
    assert rows[0].output_tokens == r.json()["usage"]["output_tokens"]


async def test_credentials_work_only_for_a_live_session(
    proxy_gateway: GatewayServer, db_factory: async_sessionmaker[AsyncSession]
) -> None:
    sid, key, _ = await _session(db_factory)
    async with httpx.AsyncClient(base_url=proxy_gateway.url + "/model", timeout=30) as http:
        for headers in ({}, {"x-api-key": "sk-ant-guess"}, {"x-api-key": key + "x"}):
            r = await http.post("/v1/messages", json=_body(), headers=headers)
            assert r.status_code == 401
            assert r.json()["error"]["type"] == "authentication_error"
        r = await http.post("/v1/complete", json=_body(), headers={"x-api-key": key})
        assert r.status_code == 404 and r.json()["type"] == "error"
        async with db_factory() as db:
            session = await db.get(Session, sid)
            assert session is not None
            await end_session(db, session, SessionStatus.STOPPED)
            await db.commit()
        r = await http.post("/v1/messages", json=_body(), headers={"x-api-key": key})
        assert r.status_code == 401 and "ended" in r.json()["error"]["message"]


async def test_a_spent_session_budget_refuses_with_an_error_naming_it(
    proxy_gateway: GatewayServer, db_factory: async_sessionmaker[AsyncSession]
) -> None:
    sid, key, _ = await _session(db_factory, session_budget=0.0001)
    async with httpx.AsyncClient(base_url=proxy_gateway.url + "/model", timeout=30) as http:
        first = await http.post("/v1/messages", json=_body("x" * 800), headers={"x-api-key": key})
        assert first.status_code == 200
        second = await http.post("/v1/messages", json=_body(), headers={"x-api-key": key})
    assert second.status_code == 400
    error = second.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "session budget" in error["message"] and "$0.0001" in error["message"]
    async with db_factory() as db:
        session = await db.get(Session, sid)
        assert session is not None and session.reserved_usd == 0
        rows = (
            await db.exec(select(ModelRequest).where(col(ModelRequest.session_id) == sid))
        ).all()
    assert len(rows) == 1  # the refused request never reached upstream


async def test_concurrent_children_cannot_overshoot_the_tree_budget(
    proxy_gateway: GatewayServer, db_factory: async_sessionmaker[AsyncSession]
) -> None:
    budget = 0.002
    root, root_key, _ = await _session(db_factory, tree_budget=budget)
    keys = [root_key] + [(await _session(db_factory, root_id=root))[1] for _ in range(3)]
    statuses: list[int] = []

    async def hammer(http: httpx.AsyncClient, key: str) -> None:
        for _ in range(40):
            r = await http.post("/v1/messages", json=_body("y" * 400), headers={"x-api-key": key})
            statuses.append(r.status_code)
            if r.status_code == 400:
                assert "tree budget" in r.json()["error"]["message"]
                return
            if r.status_code == 429:
                assert r.headers["retry-after"] == "1"
                await asyncio.sleep(0.01)

    async with httpx.AsyncClient(base_url=proxy_gateway.url + "/model", timeout=30) as http:
        await asyncio.gather(*(hammer(http, k) for k in keys))
    async with db_factory() as db:
        tree = await db.get(SpawnTree, root)
        rows = (await db.exec(select(ModelRequest).where(col(ModelRequest.root_id) == root))).all()
    assert tree is not None
    largest = max(r.cost_usd for r in rows)
    assert statuses.count(400) == 4, statuses  # every session was stopped by the budget
    assert budget <= tree.spend_usd <= budget + largest
    assert tree.spend_usd == pytest.approx(sum(r.cost_usd for r in rows))
    assert tree.reserved_usd == pytest.approx(0, abs=1e-12)


async def test_an_unreachable_upstream_is_a_502_and_releases_the_reservation(
    tmp_path: Path,
    redis_server: RedisContainer,
    postgres_server: PostgresContainer,
    s3_server: S3Container,
    scripted_model: ScriptedModelServer,
    db_factory: async_sessionmaker[AsyncSession],
) -> None:
    settings = full_stack_settings(
        tmp_path,
        redis_server,
        postgres_server,
        s3_server,
        scripted_model,
        anthropic_base_url=f"http://127.0.0.1:{free_port()}",
        proxy_connect_timeout_s=2,
    )
    gateway = GatewayServer(settings).start()
    try:
        sid, key, _ = await _session(db_factory, session_budget=1.0)
        async with httpx.AsyncClient(base_url=gateway.url + "/model", timeout=30) as http:
            r = await http.post("/v1/messages", json=_body(), headers={"x-api-key": key})
        assert r.status_code == 502 and r.json()["error"]["type"] == "api_error"
        async with db_factory() as db:
            session = await db.get(Session, sid)
            rows = (
                await db.exec(select(ModelRequest).where(col(ModelRequest.session_id) == sid))
            ).all()
        assert session is not None and session.reserved_usd == 0
        assert session.total_cost_usd == 0
        assert len(rows) == 1 and rows[0].status_code == 502 and rows[0].error
    finally:
        gateway.stop()
