"""Event history: persisted envelopes (database) completed by the retained ones (Redis Stream).

The two queries behind replays and ``GET /events``; the routes hold no SQL. Each read opens a
short-lived ``db`` handle and returns at most one page, so no replay holds a whole history.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Event
from gateway.services.events import (
    ArchiveReader,
    envelope_seq,
    first_retained_seq,
    read_stream,
)


def archive_reader(db_factory: async_sessionmaker[AsyncSession]) -> ArchiveReader:
    """Reads pages of persisted envelopes (for replays older than the stream retains)."""

    async def read(session_id: str, first: int, last: int, limit: int) -> list[bytes]:
        async with db_factory() as db:
            rows = await db.exec(
                select(Event.envelope)
                .where(Event.session_id == session_id, Event.seq >= first, Event.seq <= last)
                .order_by(col(Event.seq))
                .limit(limit)
            )
            return [r.encode() for r in rows.all()]

    return read


@dataclass(frozen=True)
class HistoryPage:
    """``events``: envelopes (parsed) and gap markers, in seq order; continue after
    ``next_after_seq`` while ``has_more``."""

    events: list[dict[str, Any]]
    next_after_seq: int
    has_more: bool


async def read_page(
    *,
    db_factory: async_sessionmaker[AsyncSession],
    redis: aioredis.Redis,
    session_id: str,
    after_seq: int,
    limit: int,
) -> HistoryPage:
    """Up to ``limit`` items after ``after_seq``: from the database, holes filled from the
    stream, and what is in neither (older than the stream retains, never persisted — e.g.
    dead-lettered) reported as ``{"type": "gap", "from_seq", "to_seq"}``, never skipped.

    Raises DependencyUnavailable("redis") or SQLAlchemyError.
    """
    async with db_factory() as db:
        rows = await db.exec(
            select(Event.seq, Event.envelope)
            .where(Event.session_id == session_id, Event.seq > after_seq)
            .order_by(col(Event.seq))
            .limit(limit)
        )
        merged: dict[int, bytes] = {seq: raw.encode() for seq, raw in rows.all()}
    for raw in await read_stream(redis, session_id, after_seq, limit):
        merged.setdefault(envelope_seq(raw), raw)
    first_retained = await first_retained_seq(redis, session_id)
    items: list[dict[str, Any]] = []
    expected = after_seq + 1
    last = after_seq
    for seq in sorted(merged):
        if len(items) >= limit:
            break
        if seq > expected:
            items.append(_gap(session_id, expected, seq - 1))
            last = seq - 1
            if len(items) >= limit:
                break
        items.append(json.loads(merged[seq]))
        last = seq
        expected = seq + 1
    has_more = len(items) >= limit
    if not has_more and first_retained is not None and first_retained > expected:
        # Everything below the stream's first entry that the database lacks is gone.
        items.append(_gap(session_id, expected, first_retained - 1))
        last = first_retained - 1
        has_more = True
    return HistoryPage(items, last, has_more)


def _gap(session_id: str, first: int, last: int) -> dict[str, Any]:
    return {"type": "gap", "session_id": session_id, "from_seq": first, "to_seq": last}
