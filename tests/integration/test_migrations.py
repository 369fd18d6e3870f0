"""Alembic migrations: a database of the previous release is upgraded in place, rows kept."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlmodel import SQLModel

from gateway.db.engine import make_db_factory, make_engine
from gateway.db.migrate import current_revision, head_revision, migrate
from gateway.db.models import Turn, TurnStatus
from tests.containers import PostgresContainer


@pytest.fixture(params=["sqlite", "postgresql"])
async def empty_engine(
    request: pytest.FixtureRequest, tmp_path: Path, postgres_server: PostgresContainer
) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty database (a fresh PostgreSQL database per test)."""
    if request.param == "sqlite":
        eng = make_engine(f"sqlite+aiosqlite:///{tmp_path}/m.db")
        yield eng
        await eng.dispose()
        return
    name = f"m_{uuid.uuid4().hex[:10]}"
    admin = make_engine(postgres_server.url)
    async with admin.connect() as conn:
        await conn.execute(text("COMMIT"))
        await conn.execute(text(f"CREATE DATABASE {name}"))
    await admin.dispose()
    eng = make_engine(postgres_server.url.rsplit("/", 1)[0] + f"/{name}")
    yield eng
    await eng.dispose()


def _diff(conn: Connection) -> list[object]:
    return list(compare_metadata(MigrationContext.configure(conn), SQLModel.metadata))


async def test_a_fresh_database_is_migrated_to_exactly_the_models(
    empty_engine: AsyncEngine,
) -> None:
    await migrate(empty_engine)
    await migrate(empty_engine)  # idempotent
    async with empty_engine.connect() as conn:
        assert await conn.run_sync(current_revision) == head_revision()
        assert await conn.run_sync(_diff) == []


async def test_the_previous_release_schema_is_upgraded_with_its_rows(
    empty_engine: AsyncEngine,
) -> None:
    """Revision 0001 is what the release before migrations made with create_all, with no
    alembic_version table: it is stamped, then upgraded; finished turns count as recorded."""
    await migrate(empty_engine, "0001")
    sid, done, queued = (str(uuid.uuid4()) for _ in range(3))
    async with empty_engine.begin() as conn:
        await conn.execute(text("DROP TABLE alembic_version"))
        await conn.execute(
            text(
                "INSERT INTO session (id, owner, status, workspace_type, workspace_volume,"
                " config, root_id, depth, live_children, created_at, last_activity,"
                " total_cost_usd, total_turns, usage) VALUES (:id, 'alice', 'IDLE',"
                " 'ephemeral', 'v', '{}', :id, 0, 0, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP,"
                " 0.5, 1, '{}')"
            ),
            {"id": sid},
        )
        for turn_id, status in ((done, "COMPLETED"), (queued, "QUEUED")):
            await conn.execute(
                text(
                    "INSERT INTO turn (id, session_id, prompt, status, created_at,"
                    " completed_at) VALUES (:id, :sid, 'hi', :status, CURRENT_TIMESTAMP,"
                    " CURRENT_TIMESTAMP)"
                ),
                {"id": turn_id, "sid": sid, "status": status},
            )
    await migrate(empty_engine)
    async with empty_engine.connect() as conn:
        assert await conn.run_sync(current_revision) == head_revision()
        assert await conn.run_sync(_diff) == []
    async with make_db_factory(empty_engine)() as db:
        finished = await db.get(Turn, done)
        waiting = await db.get(Turn, queued)
    assert finished is not None and finished.status is TurnStatus.COMPLETED
    assert finished.recorded_at is not None and finished.pending_files is None
    assert waiting is not None and waiting.recorded_at is None
