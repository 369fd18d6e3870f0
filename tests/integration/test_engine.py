"""The database engine's checkout ping on a real PostgreSQL: one round trip outside any
transaction, a fresh connection not pinged, and a restarted server costing no request an
error."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.db.engine import make_engine
from tests.servers import PostgresServer


@pytest.fixture
async def own_postgres() -> AsyncIterator[PostgresServer]:
    """A PostgreSQL of this test's own, which it may stop and start."""
    server = await asyncio.to_thread(PostgresServer().start)
    yield server
    await asyncio.to_thread(server.stop)


async def _select_one(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text("SELECT 41 + 1"))).scalar_one()) - 41


async def test_a_used_connection_is_pinged_in_one_query_outside_a_transaction(
    own_postgres: PostgresServer,
) -> None:
    engine = make_engine(own_postgres.url, pool_size=1, max_overflow=0)
    seen: list[str] = []
    try:
        async with engine.connect() as conn:  # fresh: no ping
            raw = await conn.get_raw_connection()
            assert raw.driver_connection is not None
            raw.driver_connection.add_query_logger(lambda record: seen.append(record.query))
            await conn.execute(text("SELECT 2"))
        # (the logger sees simple-protocol queries; the statements themselves are prepared)
        assert seen == ["BEGIN;", "ROLLBACK;"], seen
        seen.clear()
        assert await _select_one(engine) == 1  # the same connection, used: pinged once
        assert seen == ["SELECT 1", "BEGIN;", "ROLLBACK;"], seen
    finally:
        await engine.dispose()


async def test_a_restarted_database_costs_no_request_an_error(
    own_postgres: PostgresServer,
) -> None:
    engine = make_engine(own_postgres.url, pool_size=2, max_overflow=0)
    try:
        # Two pooled connections, both used; the restart breaks both.
        async with engine.connect() as a, engine.connect() as b:
            await a.execute(text("SELECT 1"))
            await b.execute(text("SELECT 1"))
        await asyncio.to_thread(own_postgres.halt)
        await asyncio.to_thread(own_postgres.resume)
        for _ in range(3):  # each checkout finds its connection dead, or a new one
            assert await _select_one(engine) == 1
        async with engine.connect() as a, engine.connect() as b:
            assert (await a.execute(text("SELECT 1"))).scalar_one() == 1
            assert (await b.execute(text("SELECT 1"))).scalar_one() == 1
    finally:
        await engine.dispose()


async def test_a_database_that_is_down_is_an_error_not_a_wait(
    own_postgres: PostgresServer,
) -> None:
    engine = make_engine(own_postgres.url, pool_size=1, max_overflow=0)
    try:
        assert await _select_one(engine) == 1
        await asyncio.to_thread(own_postgres.halt)
        with pytest.raises((OSError, ConnectionError)):
            await asyncio.wait_for(_select_one(engine), 30)
        await asyncio.to_thread(own_postgres.resume)
        assert await _select_one(engine) == 1
    finally:
        await engine.dispose()
