"""The async engine and the ``db`` handles (named db: "session" is the product noun).

Handles are short-lived: every request, stream and background task opens one for its own
queries and closes it (``async with db_factory() as db``), so a connection is held only while a
transaction runs, never while a client or a turn is awaited.

SQLite runs in WAL mode with a 30 s busy timeout, so readers never block the writer and a
writer waits instead of failing at once when another one commits; foreign keys are enforced, as
on PostgreSQL.
"""

from __future__ import annotations

from typing import Any

import asyncpg
from sqlalchemy import event
from sqlalchemy.engine.interfaces import AdaptedConnection
from sqlalchemy.exc import InvalidatePoolError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db import models  # noqa: F401  (registers the tables)


def make_engine(
    url: str, *, pool_size: int = 10, max_overflow: int = 20, pool_timeout_s: float = 10.0
) -> AsyncEngine:
    """Engine for ``sqlite+aiosqlite://`` or ``postgresql+asyncpg://`` URLs.

    ``pool_timeout_s`` bounds how long a handle waits for a free connection before
    ``sqlalchemy.exc.TimeoutError`` (reported as 503 database).
    """
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url,
            connect_args={"timeout": 30},
            pool_size=pool_size,
            max_overflow=max_overflow,
            pool_timeout=pool_timeout_s,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    engine = create_async_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, pool_timeout=pool_timeout_s
    )
    event.listen(engine.sync_engine, "checkout", _ping_on_checkout)
    event.listen(engine.sync_engine, "checkin", _mark_used)
    return engine


def _mark_used(_dbapi_connection: Any, record: ConnectionPoolEntry) -> None:
    record.info["used"] = True


def _ping_on_checkout(
    dbapi_connection: AdaptedConnection, record: ConnectionPoolEntry, _proxy: Any
) -> None:
    """Pessimistic disconnect handling, as ``pool_pre_ping`` does it, in one round trip.

    A connection that has been used before is pinged with ``SELECT 1`` in the simple query
    protocol (no prepared statement, so PgBouncer's transaction mode is fine with it). The
    asyncpg dialect's own pre-ping wraps its ping in BEGIN ... ROLLBACK: three round trips on
    every checkout. A failed ping makes the pool drop every connection older than now and
    open a new one for this checkout (what pre-ping does), so a PostgreSQL restart costs no
    request an error.
    """
    if not record.info.get("used"):
        return  # just connected
    try:
        dbapi_connection.run_async(lambda conn: conn.execute("SELECT 1"))
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise InvalidatePoolError(f"ping failed: {exc!r}") from exc


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    # Foreign keys as on PostgreSQL: an event of a session deleted meanwhile is refused, not
    # left behind as an orphan.
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_db_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Factory of ``db`` handles; objects stay usable after commit and after the handle closes."""
    return async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)


def pool_in_use(engine: AsyncEngine) -> int:
    """Connections currently checked out of the engine's pool (for /metrics)."""
    pool = engine.pool
    checkedout = getattr(pool, "checkedout", None)
    return int(checkedout()) if callable(checkedout) else 0
