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
import contextlib
import json
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from gateway.errors import DependencyUnavailable
from gateway.supervisor import Supervisor
from wrapper.protocol import ENVELOPE_FIELD, events_key, live_channel, seq_of_stream_id

logger = logging.getLogger(__name__)

_RESYNC = b"resync"
_OVERFLOW = b"overflow"
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


@dataclass(eq=False)
class Subscription:
    """One local follower of a session: a queue of raw envelopes and markers, bounded by
    count (``queue.maxsize``) and by ``max_bytes``; past either bound it is overflowed: the
    queue is dropped, ``overflow`` is set, and the follower gets SlowConsumer."""

    session_id: str
    queue: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(maxsize=1000))
    max_bytes: int = 8 * 1024 * 1024
    queued_bytes: int = 0
    overflowed: bool = False
    overflow: asyncio.Event = field(default_factory=asyncio.Event)
    accept: Callable[[bytes], bool] | None = None
    """Filter: only messages it accepts are queued (a turn waiter wants notices only)."""

    def deliver(self, raw: bytes) -> None:
        """Queue without waiting; past a bound, mark the subscription overflowed."""
        if self.overflowed:
            return
        if self.accept is not None and raw != _RESYNC and not self.accept(raw):
            return
        if self.queued_bytes + len(raw) > self.max_bytes or self.queue.full():
            self.overflowed = True
            self.overflow.set()
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queued_bytes = 0
            self.queue.put_nowait(_OVERFLOW)
            return
        self.queued_bytes += len(raw)
        self.queue.put_nowait(raw)

    async def get(self) -> bytes:
        """Next queued item."""
        raw = await self.queue.get()
        self.queued_bytes = max(0, self.queued_bytes - len(raw))
        return raw


@dataclass(eq=False)
class _Channel:
    subscribers: set[Subscription] = field(default_factory=set)
    confirmed: asyncio.Event = field(default_factory=asyncio.Event)


class EventHub:
    """The process's single pub/sub connection and its fan-out to local subscriptions."""

    def __init__(
        self, client: aioredis.Redis, *, queue_size: int = 1000, queue_bytes: int = 8 << 20
    ) -> None:
        self._redis = client
        self._pubsub = client.pubsub()
        self._channels: dict[bytes, _Channel] = {}
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._anchor = f"ccgate:hub:{socket.gethostname()}:{os.getpid()}".encode()
        # Serialises (un)subscribe calls: concurrent ones could each open a connection.
        self._lock = asyncio.Lock()

    async def start(self, supervisor: Supervisor) -> None:
        """Open the connection (anchored by a private channel) and start the reader under
        ``supervisor``.

        If Redis is down now, the reader keeps retrying; /health reports it meanwhile.
        """
        with contextlib.suppress(RedisError, OSError):
            async with self._lock:
                await self._pubsub.subscribe(self._anchor)
        supervisor.start("event-hub", self._read)

    @property
    def subscription_count(self) -> int:
        """Local followers across all sessions."""
        return sum(len(c.subscribers) for c in self._channels.values())

    async def close(self) -> None:
        """Close the connection (the supervisor stops the reader)."""
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]

    @property
    def channel_count(self) -> int:
        """Sessions currently subscribed by this process."""
        return len(self._channels)

    async def subscribe(
        self, session_id: str, *, accept: Callable[[bytes], bool] | None = None
    ) -> Subscription:
        """Follow a session; returns once Redis confirmed the subscription. ``accept``
        filters what is queued for this follower.

        Raises DependencyUnavailable("redis", ...) when Redis does not answer in 5 s.
        """
        name = live_channel(session_id).encode()
        sub = Subscription(
            session_id,
            asyncio.Queue(maxsize=self._queue_size),
            max_bytes=self._queue_bytes,
            accept=accept,
        )
        channel = self._channels.get(name)
        if channel is None:
            channel = self._channels[name] = _Channel()
            try:
                async with self._lock:
                    await self._pubsub.subscribe(name)
            except (RedisError, OSError) as exc:
                self._channels.pop(name, None)
                raise DependencyUnavailable("redis", str(exc)) from exc
        channel.subscribers.add(sub)
        try:
            await asyncio.wait_for(channel.confirmed.wait(), 5)
        except TimeoutError as exc:
            await self.unsubscribe(sub)
            raise DependencyUnavailable("redis", "subscription not confirmed in 5s") from exc
        return sub

    async def unsubscribe(self, sub: Subscription) -> None:
        """Stop following; the channel is released when its last local follower leaves."""
        name = live_channel(sub.session_id).encode()
        channel = self._channels.get(name)
        if channel is None:
            return
        channel.subscribers.discard(sub)
        if not channel.subscribers:
            del self._channels[name]
            with contextlib.suppress(RedisError, OSError):
                async with self._lock:
                    await self._pubsub.unsubscribe(name)

    async def _read(self) -> None:
        # (Re)started: followers re-read their streams, in case messages were missed.
        for channel in list(self._channels.values()):
            for sub in list(channel.subscribers):
                sub.deliver(_RESYNC)
        while True:
            try:
                if not self._pubsub.subscribed:
                    async with self._lock:
                        await self._pubsub.subscribe(self._anchor)
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                logger.warning("event hub: redis connection lost: %s", exc)
                await asyncio.sleep(0.5)
                continue
            if message is None:
                continue
            kind = message["type"]
            target = self._channels.get(message["channel"])
            if target is None:
                continue
            if kind == "message":
                for sub in list(target.subscribers):
                    sub.deliver(message["data"])
            elif kind == "subscribe":
                if target.confirmed.is_set():
                    # Re-subscribed after a reconnect: followers re-read the stream.
                    for sub in list(target.subscribers):
                        sub.deliver(_RESYNC)
                target.confirmed.set()


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
            if raw == _OVERFLOW:
                raise SlowConsumer(f"client fell more than {sub.queue.maxsize} events behind")
            if raw == _RESYNC:
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
