"""The persister: writes a batch of events in one statement, and dead-letters what never fits.

A batch is one ``INSERT … ON CONFLICT (session_id, seq) DO NOTHING`` (PostgreSQL and SQLite), so
re-reading entries after a failure or a replica takeover never duplicates a row. Events of
sessions deleted meanwhile are left out; if a delete commits between that check and the insert
(PostgreSQL reports a foreign-key violation) the batch is filtered again and retried once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import DeadLetter, Event, Session
from gateway.services.envelopes import envelope_problem


@dataclass(frozen=True, eq=False)
class Entry:
    """One stream entry, parsed (``envelope`` is None when it is not a valid envelope)."""

    session_id: str
    entry_id: str
    raw: bytes
    envelope: dict[str, Any] | None
    problem: str | None = None

    @property
    def seq(self) -> int | None:
        """The envelope's seq (None for an unparsable entry)."""
        return int(self.envelope["seq"]) if self.envelope is not None else None


def parse_entry(
    session_id: str, entry_id: str, raw: bytes, *, notice_key: bytes | None = None
) -> Entry:
    """Parse one entry's envelope JSON; a malformed or forged one keeps its problem for the
    dead letter (services/envelopes.py says what an envelope must be).

    The seq must equal the entry id's (``<seq>-0``): the stream id is what clients resume by.
    """
    try:
        envelope = json.loads(raw)
        if not isinstance(envelope, dict):
            raise ValueError("the envelope is not a JSON object")
        seq = envelope.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
            raise ValueError("the envelope has no positive integer seq")
        if entry_id.split("-")[0] != str(seq):
            raise ValueError(f"seq {seq} does not match the entry id {entry_id}")
        if not isinstance(envelope.get("type"), str):
            raise ValueError("the envelope has no type")
        problem = envelope_problem(session_id, envelope, notice_key)
        if problem is not None:
            raise ValueError(problem)
    except ValueError as exc:
        return Entry(session_id, entry_id, raw, None, str(exc))
    return Entry(session_id, entry_id, raw, envelope)


_INSERT_IGNORE = {
    True: postgresql.insert(Event).on_conflict_do_nothing(index_elements=["session_id", "seq"]),
    False: sqlite.insert(Event).on_conflict_do_nothing(index_elements=["session_id", "seq"]),
}
"""``INSERT … ON CONFLICT (session_id, seq) DO NOTHING`` for PostgreSQL (True) and SQLite."""


def _row(entry: Entry) -> dict[str, Any]:
    assert entry.envelope is not None
    turn_id = entry.envelope.get("turn_id")
    return {
        "session_id": entry.session_id,
        "seq": entry.seq,
        "turn_id": str(turn_id)[:36] if turn_id is not None else None,
        "type": str(entry.envelope["type"])[:64],
        "envelope": entry.raw.decode("utf-8", errors="replace"),
    }


async def _existing_sessions(db: AsyncSession, ids: set[str]) -> set[str]:
    rows = await db.exec(select(Session.id).where(col(Session.id).in_(ids)))
    return set(rows.all())


async def persist_events(db_factory: async_sessionmaker[AsyncSession], entries: list[Entry]) -> int:
    """Insert the events of ``entries`` (valid envelopes only) in one statement and commit.

    Returns how many rows the batch carried (duplicates included). Raises SQLAlchemyError when
    the database fails (the caller retries, then splits the batch to find a poison entry).
    """
    valid = [e for e in entries if e.envelope is not None]
    if not valid:
        return 0
    for attempt in (1, 2):
        async with db_factory() as db:
            alive = await _existing_sessions(db, {e.session_id for e in valid})
            rows = [_row(e) for e in valid if e.session_id in alive]
            if not rows:
                return 0
            statement = _INSERT_IGNORE[db.get_bind().dialect.name == "postgresql"]
            try:
                # executemany: one cached statement, sent as multi-row INSERTs by the driver
                # layer ("insertmanyvalues"), rather than a fresh VALUES list compiled per batch.
                await (await db.connection()).execute(statement, rows)
                await db.commit()
            except IntegrityError:
                await db.rollback()
                if attempt == 2:
                    raise
                continue
            return len(rows)
    return 0


async def dead_letter(
    db_factory: async_sessionmaker[AsyncSession], entry: Entry, *, attempts: int, reason: str
) -> None:
    """Keep an entry the ledger gives up on, with why (its own transaction)."""
    async with db_factory() as db:
        db.add(
            DeadLetter(
                session_id=entry.session_id[:36],
                entry_id=entry.entry_id[:64],
                seq=entry.seq,
                attempts=attempts,
                reason=reason[:4000],
                envelope=entry.raw.decode("utf-8", errors="replace"),
            )
        )
        await db.commit()
