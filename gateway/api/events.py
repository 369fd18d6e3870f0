"""Event history and Server-Sent Events, for clients that page or cannot use WebSockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from gateway.deps import OwnedSession, ServiceDep
from gateway.errors import GatewayError, InvalidRequest
from gateway.services.events import SlowConsumer, envelope_seq, follow_session
from gateway.services.history import archive_reader, read_page

logger = logging.getLogger(__name__)
MAX_SEQ = 2**31 - 1
"""Largest seq (the events table's seq is a 32-bit integer on PostgreSQL)."""

router = APIRouter(prefix="/sessions/{session_id}/events", tags=["events"])

_KEEPALIVE_S = 15.0
_BATCH = 256


def _frame(item: bytes) -> bytes:
    """One SSE event: an envelope (``id: <seq>``) or a notice/gap (``event: <type>``)."""
    if item.startswith(b'{"seq":'):
        return b"id: %d\ndata: %s\n\n" % (envelope_seq(item), item)
    kind = json.loads(item).get("type", "notice")
    return b"event: %s\ndata: %s\n\n" % (str(kind).encode(), item)


def _failure_frame(exc: Exception) -> bytes:
    kind = "slow_consumer" if isinstance(exc, SlowConsumer) else "error"
    detail = str(exc) if isinstance(exc, SlowConsumer | GatewayError) else "internal error"
    return f"event: {kind}\ndata: {json.dumps({'detail': detail})}\n\n".encode()


@router.get("")
async def list_events(
    session: OwnedSession,
    request: Request,
    after_seq: Annotated[int, Query(ge=0, le=MAX_SEQ)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    """A page of the session's history: envelopes with seq > ``after_seq``, in order.

    Persisted events come from the database, the newest (not yet persisted) from Redis. A
    range that is in neither is an item ``{"type": "gap", "from_seq", "to_seq"}``: nothing is
    skipped silently. Continue with ``after_seq=next_after_seq`` while ``has_more``.
    """
    state = request.app.state
    page = await read_page(
        db_factory=state.db_factory,
        redis=state.redis,
        session_id=session.id,
        after_seq=after_seq,
        limit=limit,
    )
    return {
        "session_id": session.id,
        "events": page.events,
        "next_after_seq": page.next_after_seq,
        "has_more": page.has_more,
    }


def _resume_point(after_seq: int | None, last_event_id: str | None) -> int:
    if last_event_id:
        try:
            seq = int(last_event_id)
        except ValueError as exc:
            raise InvalidRequest("Last-Event-ID must be the seq of an event") from exc
        if not 0 <= seq <= MAX_SEQ:
            raise InvalidRequest(f"Last-Event-ID must be a seq between 0 and {MAX_SEQ}")
        return seq
    return after_seq or 0


@router.get("/stream", response_class=StreamingResponse)
async def stream_events(
    session: OwnedSession,
    request: Request,
    service: ServiceDep,
    after_seq: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
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
        except Exception as exc:
            logger.exception("SSE stream of %s failed", session.id)
            await queue.put(exc)

    async def body() -> AsyncIterator[bytes]:
        task = asyncio.create_task(pump())
        try:
            yield b"retry: 2000\n\n"
            while not overflow.is_set():
                try:
                    async with asyncio.timeout(_KEEPALIVE_S):
                        item = await queue.get()
                except TimeoutError:
                    yield b": keepalive\n\n"
                    continue
                # Everything already queued goes out in one write (fewer sends under load).
                frames: list[bytes] = []
                while True:
                    if isinstance(item, Exception):
                        if isinstance(item, SlowConsumer):
                            state.metrics.slow_consumers.inc()
                        frames.append(_failure_frame(item))
                        yield b"".join(frames)
                        return
                    frames.append(_frame(item))
                    if len(frames) >= _BATCH or queue.empty():
                        break
                    item = queue.get_nowait()
                yield b"".join(frames)
            state.metrics.slow_consumers.inc()
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
