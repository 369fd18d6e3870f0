"""Event history and Server-Sent Events, for clients that page or cannot use WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlmodel import col, select

from gateway.api.stream import archive_reader
from gateway.db.models import Event
from gateway.deps import DbDep, OwnedSession, ServiceDep
from gateway.errors import GatewayError, InvalidRequest
from gateway.services.events import SlowConsumer, envelope_seq, follow_session, read_stream

router = APIRouter(prefix="/sessions/{session_id}/events", tags=["events"])

_KEEPALIVE_S = 15.0


@router.get("")
async def list_events(
    session: OwnedSession,
    request: Request,
    db: DbDep,
    after_seq: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """A page of the session's history: envelopes with seq > ``after_seq``, in order.

    Persisted events come from the database, the newest (not yet persisted) from Redis.
    Continue with ``after_seq=next_after_seq`` while ``has_more``.
    """
    rows = await db.exec(
        select(Event.envelope)
        .where(Event.session_id == session.id, Event.seq > after_seq)
        .order_by(col(Event.seq))
        .limit(limit)
    )
    merged = {envelope_seq(raw.encode()): raw.encode() for raw in rows.all()}
    if len(merged) < limit:
        for raw in await read_stream(request.app.state.redis, session.id, after_seq, limit):
            merged.setdefault(envelope_seq(raw), raw)
    seqs = sorted(merged)[:limit]
    return {
        "session_id": session.id,
        "events": [json.loads(merged[s]) for s in seqs],
        "next_after_seq": seqs[-1] if seqs else after_seq,
        "has_more": len(seqs) == limit,
    }


def _resume_point(after_seq: int | None, last_event_id: str | None) -> int:
    if last_event_id:
        try:
            return max(0, int(last_event_id))
        except ValueError as exc:
            raise InvalidRequest("Last-Event-ID must be the seq of an event") from exc
    return after_seq or 0


@router.get("/stream", response_class=StreamingResponse)
async def stream_events(
    session: OwnedSession,
    request: Request,
    service: ServiceDep,
    after_seq: Annotated[int | None, Query(ge=0)] = None,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> StreamingResponse:
    """Server-Sent Events: every event after ``Last-Event-ID`` (or ``after_seq``), then live.

    Each event is ``id: <seq>`` + ``data: <envelope JSON>``; a history gap is
    ``event: gap``; a client too slow for its buffer gets ``event: slow_consumer`` and the
    stream ends (reconnect with Last-Event-ID). Comment lines keep idle connections alive.
    """
    start = _resume_point(after_seq, last_event_id)
    state = request.app.state
    overflow = asyncio.Event()
    queue: asyncio.Queue[bytes | Exception] = asyncio.Queue(maxsize=64)

    async def pump() -> None:
        try:
            async for raw in follow_session(
                service.hub,
                state.redis,
                session.id,
                after_seq=start,
                archive=archive_reader(state.db_factory),
                overflow=overflow,
            ):
                await queue.put(raw)
        except (SlowConsumer, GatewayError) as exc:
            await queue.put(exc)

    async def body() -> AsyncIterator[bytes]:
        task = asyncio.create_task(pump())
        try:
            yield b"retry: 2000\n\n"
            while not overflow.is_set():
                try:
                    item = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                if isinstance(item, Exception):
                    kind = "slow_consumer" if isinstance(item, SlowConsumer) else "error"
                    yield f"event: {kind}\ndata: {json.dumps({'detail': str(item)})}\n\n".encode()
                    return
                if item.startswith(b'{"seq":'):
                    yield b"id: %d\ndata: %s\n\n" % (envelope_seq(item), item)
                else:
                    yield b"event: gap\ndata: %s\n\n" % item
            yield b'event: slow_consumer\ndata: {"detail": "buffer overflow"}\n\n'
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    return StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
