"""Event delivery to clients: replay from the session's Redis Stream, then live from pub/sub.

Each gateway process holds ONE pub/sub connection (:class:`EventHub`); it subscribes to a
session's live channel while at least one local client follows that session and fans messages out
to per-client bounded queues. :func:`follow_session` gives a client every event after a seq
exactly once and in order:

1. subscribe (and wait for Redis to confirm the subscription),
2. replay ``XRANGE events (after_seq ...`` from the stream (older seqs from the database),
3. pass live messages, skipping seqs already sent and re-reading the stream on any hole.

Besides envelopes, the live channel carries the gateway's notices (JSON without ``seq``:
``turn_recorded``); they are passed to clients as they come, never replayed. Anything else that
is not an envelope is dropped (the channel is writable from inside the container).

Because the wrapper appends to the stream before publishing (one Lua script), anything published
after step 1 is either replayed in step 2 or arrives in step 3.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from gateway.errors import DependencyUnavailable
from gateway.services.event_hub import OVERFLOW, RESYNC, EventHub
from wrapper.protocol import ENVELOPE_FIELD, events_key, seq_of_stream_id

logger = logging.getLogger(__name__)

_REPLAY_PAGE = 500
_SEQ_PREFIX = b'{"seq":'


class SlowConsumer(Exception):
    """A client's bounded buffer filled up: it is disconnected and may resume by seq."""


def envelope_seq(raw: bytes) -> int:
    """The seq of envelope JSON produced by ``wrapper.protocol.encode_envelope`` (fast path:
    the seq is always the first member); raises ValueError on anything else."""
    if not raw.startswith(_SEQ_PREFIX):
        raise ValueError("not an envelope")
    end = raw.index(b",", len(_SEQ_PREFIX))
    return int(raw[len(_SEQ_PREFIX) : end])


ArchiveReader = Callable[[str, int, int, int], Awaitable[list[bytes]]]
"""(session_id, first_seq, last_seq, limit) -> up to ``limit`` persisted envelopes in that
range, in seq order (a page: callers read on from the last seq they got)."""

ARCHIVE_PAGE = 500
"""Envelopes per archive read: a replay never holds more than this many in memory."""


def notice_of(raw: bytes, session_id: str) -> bytes | None:
    """``raw`` if it is a gateway notice about ``session_id`` (JSON object with a known
    ``type`` and no ``seq``), else None."""
    try:
        message = json.loads(raw)
    except ValueError:
        return None
    if (
        isinstance(message, dict)
        and message.get("type") in NOTICE_TYPES
        and message.get("session_id") == session_id
        and "seq" not in message
    ):
        return raw
    return None


NOTICE_TYPES = frozenset({"turn_recorded", "turn_silent", "queue_position"})


async def read_stream(
    client: aioredis.Redis, session_id: str, after_seq: int, count: int = _REPLAY_PAGE
) -> list[bytes]:
    """Up to ``count`` retained envelopes with seq > ``after_seq``, in order."""
    try:
        entries = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await client.xrange(
                events_key(session_id), min=f"({after_seq}-0" if after_seq else "-", count=count
            ),
        )
    except (RedisError, OSError) as exc:
        raise DependencyUnavailable("redis", str(exc)) from exc
    return [fields[ENVELOPE_FIELD.encode()] for _, fields in entries]


async def first_retained_seq(client: aioredis.Redis, session_id: str) -> int | None:
    """Seq of the oldest event still in the stream, or None when it is empty."""
    try:
        first = cast(
            list[tuple[bytes, dict[bytes, bytes]]],
            await client.xrange(events_key(session_id), count=1),
        )
    except (RedisError, OSError) as exc:
        raise DependencyUnavailable("redis", str(exc)) from exc
    return seq_of_stream_id(first[0][0]) if first else None


def gap_marker(session_id: str, from_seq: int, to_seq: int) -> bytes:
    """A non-envelope message telling a client that seqs from..to cannot be replayed."""
    return (
        f'{{"type":"gap","session_id":"{session_id}","from_seq":{from_seq},"to_seq":{to_seq}}}'
    ).encode()


async def follow_session(
    hub: EventHub,
    client: aioredis.Redis,
    session_id: str,
    *,
    after_seq: int,
    archive: ArchiveReader,
    overflow: asyncio.Event | None = None,
) -> AsyncIterator[bytes]:
    """Every event of a session with seq > ``after_seq``, exactly once, in order, forever.

    Yields raw envelope JSON (bytes), plus a :func:`gap_marker` if a range is in neither Redis
    nor the archive. Raises SlowConsumer when the caller fell a whole buffer behind, and
    DependencyUnavailable("redis", ...) when Redis is down at the start. ``overflow`` is set the
    moment the buffer overflows, so a caller blocked on a slow client can cut it off at once.
    """
    sub = await hub.subscribe(session_id)
    if overflow is not None:
        sub.overflow = overflow
    last = after_seq
    try:

        async def catch_up() -> AsyncIterator[bytes]:
            nonlocal last
            first = await first_retained_seq(client, session_id)
            if first is not None and first > last + 1:
                while last < first - 1:
                    archived = await archive(session_id, last + 1, first - 1, ARCHIVE_PAGE)
                    for raw in archived:
                        seq = envelope_seq(raw)
                        if seq <= last:
                            continue
                        if seq > last + 1:
                            yield gap_marker(session_id, last + 1, seq - 1)
                        yield raw
                        last = seq
                    if len(archived) < ARCHIVE_PAGE:
                        break
                if last < first - 1:
                    yield gap_marker(session_id, last + 1, first - 1)
                    last = first - 1
            while True:
                page = await read_stream(client, session_id, last)
                for raw in page:
                    seq = envelope_seq(raw)
                    if seq > last:
                        yield raw
                        last = seq
                if len(page) < _REPLAY_PAGE:
                    return

        async for raw in catch_up():
            yield raw
        while True:
            raw = await sub.get()
            if raw == OVERFLOW:
                raise SlowConsumer(f"client fell more than {sub.queue.maxsize} events behind")
            if raw == RESYNC:
                async for replayed in catch_up():
                    yield replayed
                continue
            if not raw.startswith(_SEQ_PREFIX):
                notice = notice_of(raw, session_id)
                if notice is not None:
                    yield notice
                continue
            try:
                seq = envelope_seq(raw)
            except ValueError:
                continue  # not an envelope (the channel is writable from the container)
            if seq <= last:
                continue
            if seq > last + 1:
                async for replayed in catch_up():
                    yield replayed
                continue
            yield raw
            last = seq
    finally:
        await hub.unsubscribe(sub)
