"""Schema migrations at start-up (Alembic, ``gateway/db/migrations``).

A database made by a release before migrations existed (tables but no ``alembic_version``) is
stamped at revision 0001, the schema that release created, and upgraded from there. Replicas
starting together on PostgreSQL serialise on an advisory lock; SQLite's write lock does the same.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

MIGRATIONS = Path(__file__).parent / "migrations"
FIRST_REVISION = "0001"
_LOCK_KEY = 0x63636761  # "ccga": the advisory lock taken while migrating on PostgreSQL


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic Config for ccgate's migrations, bound to ``connection`` when given."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    """The newest revision this code knows."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def current_revision(connection: Connection) -> str | None:
    """The revision the database is at (None before any migration)."""
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade(connection: Connection, target: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _LOCK_KEY})
    config = alembic_config(connection)
    tables = set(inspect(connection).get_table_names())
    if "session" in tables and "alembic_version" not in tables:
        command.stamp(config, FIRST_REVISION)
    command.upgrade(config, target)


async def migrate(engine: AsyncEngine, target: str = "head") -> None:
    """Upgrade the database to ``target`` (idempotent; raises SQLAlchemyError/OSError when the
    database cannot be reached, for the caller's retry)."""
    async with engine.begin() as conn:
        await conn.run_sync(_upgrade, target)
