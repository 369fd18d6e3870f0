"""The ledger turns lifecycle events into database state, on SQLite and on PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import func, select

from gateway.config import Settings
from gateway.db.engine import create_tables, make_db_factory, make_engine
from gateway.db.models import Event, Session, SessionStatus, Turn, TurnStatus
from gateway.services.artifacts import LocalArtifactStore
from gateway.services.ledger import Ledger
from gateway.services.runtime.docker import DockerRuntime
from gateway.services.session_redis import ensure_ledger_group
from tests.servers import PostgresServer, RedisServer
from wrapper.protocol import EventSource
from wrapper.publisher import EventPublisher


@pytest.fixture(params=["sqlite", "postgresql"])
async def engine(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: PostgresServer
) -> AsyncIterator[AsyncEngine]:
    url = (
        f"sqlite+aiosqlite:///{tmp_path}/ledger.db"
        if request.param == "sqlite"
        else postgres_server.url
    )
    eng = make_engine(url)
    await create_tables(eng)
    yield eng
    await eng.dispose()


async def _wait_for(check: Any, timeout_s: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.05)


async def test_turn_results_costs_and_status_are_recorded_once(
    engine: AsyncEngine, redis_server: RedisServer, tmp_path: Path
) -> None:
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    sid, mid1, mid2 = (str(uuid.uuid4()) for _ in range(3))
    async with db_factory() as db:
        db.add(Session(id=sid, owner="u", workspace_volume="v"))
        await db.commit()
        db.add(Turn(id=mid1, session_id=sid, prompt="one"))
        db.add(Turn(id=mid2, session_id=sid, prompt="two"))
        await db.commit()
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid, stream_maxlen=1000)
    await publisher.start()

    def wrapper(kind: str, data: dict[str, Any], turn: str | None) -> None:
        publisher.emit(kind, json.dumps(data), source=EventSource.WRAPPER, turn_id=turn)

    wrapper("ready", {"cli_session_id": sid}, None)
    for mid, total, usage in ((mid1, 0.25, 100), (mid2, 0.75, 50)):
        wrapper("turn_started", {"message_id": mid}, mid)
        publisher.emit(
            "result", json.dumps({"type": "result"}), source=EventSource.CLI, turn_id=mid
        )
        wrapper(
            "turn_completed",
            {
                "message_id": mid,
                "subtype": "success",
                "is_error": False,
                "result": f"done {mid}",
                "terminal_reason": "completed",
                "usage": {"input_tokens": usage, "output_tokens": 1},
                "total_cost_usd": total,
                "num_turns": 1,
                "duration_ms": 5,
                "files": [],
            },
            mid,
        )
    await publisher.flush(5)

    ledger = Ledger(
        settings=Settings(data_dir=tmp_path),
        redis=client,
        db_factory=db_factory,
        runtime=DockerRuntime(),
        store=LocalArtifactStore(tmp_path / "artifacts"),
    )
    ledger.track(sid)
    await ledger.start()

    async def both_done() -> bool:
        async with db_factory() as db:
            turn = await db.get(Turn, mid2)
            return turn is not None and turn.status is TurnStatus.COMPLETED

    try:
        await _wait_for(both_done)
    finally:
        await ledger.close()
    async with db_factory() as db:
        session = await db.get(Session, sid)
        assert session is not None
        assert session.status is SessionStatus.IDLE
        assert session.total_turns == 2
        assert session.total_cost_usd == pytest.approx(0.75)  # latest running total, not a sum
        assert session.usage == {"input_tokens": 150, "output_tokens": 2}
        first = await db.get(Turn, mid1)
        second = await db.get(Turn, mid2)
        assert first is not None and second is not None
        assert first.cost_usd == pytest.approx(0.25) and second.cost_usd == pytest.approx(0.5)
        assert second.result == f"done {mid2}"
        count = (await db.exec(select(func.count()).where(Event.session_id == sid))).one()
        assert count == publisher.last_seq == 7
    await publisher.close(1)
    await client.aclose()


async def test_two_ledgers_in_one_process_share_the_work_without_double_applying(
    engine: AsyncEngine,
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    db_factory = make_db_factory(engine)
    client = aioredis.Redis.from_url(redis_server.url)
    sid = str(uuid.uuid4())
    async with db_factory() as db:
        db.add(Session(id=sid, owner="u", workspace_volume="v", root_id=sid))
        await db.commit()
    await ensure_ledger_group(client, sid)
    publisher = EventPublisher(client, sid, stream_maxlen=10_000)
    await publisher.start()
    ledgers = [
        Ledger(
            settings=Settings(data_dir=tmp_path),
            redis=client,
            db_factory=db_factory,
            runtime=DockerRuntime(),
            store=LocalArtifactStore(tmp_path / "artifacts"),
        )
        for _ in range(2)
    ]
    for ledger in ledgers:
        ledger.track(sid)
        await ledger.start()
    for n in range(300):
        publisher.emit("assistant", json.dumps({"n": n}), source=EventSource.CLI, turn_id=None)
    await publisher.flush(10)

    async def all_persisted() -> bool:
        async with db_factory() as db:
            count = (await db.exec(select(func.count()).where(Event.session_id == sid))).one()
        return bool(count == 300)

    try:
        await _wait_for(all_persisted, timeout_s=20)
    finally:
        for ledger in ledgers:
            await ledger.close()
    assert "not applied yet" not in caplog.text  # no entry was applied by both
    await publisher.close(1)
    await client.aclose()
