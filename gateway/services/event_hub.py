"""The process's one pub/sub connection to Redis and its fan-out to local followers.

Connection discipline (found by CI: after a Redis restart, a follower's SUBSCRIBE reconnected
the connection while the reader's own read reconnected it too, and asyncio answered one of them
``RuntimeError: readuntil() called while another coroutine is already waiting``):

- only the reader task ever (re)connects, and it does so under the hub's lock, on a fresh
  :class:`~redis.asyncio.client.PubSub` that subscribes the anchor and every followed channel in
  one SUBSCRIBE;
- the connection has no implicit retry (``Retry(..., supported_errors=())``): a failed read or
  write raises instead of reconnecting behind the hub's back;
- followers only *write* (SUBSCRIBE/UNSUBSCRIBE) and only while the connection is ready; a failed
  write marks it not ready and the reader reconnects; a channel added while not ready is
  subscribed by that reconnect. A follower waits (bounded, 5 s) for Redis to confirm.

After every (re)connect each follower gets :data:`RESYNC` and re-reads its stream, so nothing
published while the connection was down is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway.errors import DependencyUnavailable
from gateway.supervisor import Supervisor
from wrapper.protocol import live_channel

logger = logging.getLogger(__name__)

RESYNC = b"resync"
"""Marker queued to followers: re-read the stream (the connection was (re)established)."""
OVERFLOW = b"overflow"
"""Marker queued to a follower whose buffer overflowed."""
RECONNECT_DELAY_S = 0.5
CONFIRM_TIMEOUT_S = 5.0


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
        if self.accept is not None and raw != RESYNC and not self.accept(raw):
            return
        if self.queued_bytes + len(raw) > self.max_bytes or self.queue.full():
            self.overflowed = True
            self.overflow.set()
            while not self.queue.empty():
                self.queue.get_nowait()
            self.queued_bytes = 0
            self.queue.put_nowait(OVERFLOW)
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


def _pubsub_client(client: aioredis.Redis) -> aioredis.Redis:
    """A client on ``client``'s server whose connections never retry or reconnect by
    themselves and send no health-check PINGs (whose replies a reader would race for)."""
    pool = client.connection_pool
    kwargs = dict(pool.connection_kwargs)
    kwargs.update(
        retry=Retry(NoBackoff(), 0, supported_errors=()),
        retry_on_error=[],
        retry_on_timeout=False,
        health_check_interval=0,
    )
    return aioredis.Redis(
        connection_pool=aioredis.ConnectionPool(
            connection_class=pool.connection_class, max_connections=4, **kwargs
        )
    )


class EventHub:
    """The process's single pub/sub connection and its fan-out to local subscriptions."""

    def __init__(
        self, client: aioredis.Redis, *, queue_size: int = 1000, queue_bytes: int = 8 << 20
    ) -> None:
        self._client = _pubsub_client(client)
        self._pubsub = self._client.pubsub()
        self._ready = False
        self._channels: dict[bytes, _Channel] = {}
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._anchor = f"ccgate:hub:{socket.gethostname()}:{os.getpid()}".encode()
        # Held by the reader while it (re)connects and by followers while they write.
        self._lock = asyncio.Lock()

    async def start(self, supervisor: Supervisor) -> None:
        """Start the reader under ``supervisor``; it connects, and keeps reconnecting while
        Redis is down (/health reports Redis meanwhile)."""
        supervisor.start("event-hub", self._read)

    @property
    def subscription_count(self) -> int:
        """Local followers across all sessions."""
        return sum(len(c.subscribers) for c in self._channels.values())

    @property
    def channel_count(self) -> int:
        """Sessions currently subscribed by this process."""
        return len(self._channels)

    async def close(self) -> None:
        """Close the connection (the supervisor stops the reader)."""
        self._ready = False
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()  # type: ignore[no-untyped-call]
        with contextlib.suppress(RedisError, OSError):
            await self._client.aclose()

    async def subscribe(
        self, session_id: str, *, accept: Callable[[bytes], bool] | None = None
    ) -> Subscription:
        """Follow a session; returns once Redis confirmed the subscription. ``accept``
        filters what is queued for this follower.

        Raises DependencyUnavailable("redis", ...) when Redis does not confirm in 5 s.
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
            await self._write("SUBSCRIBE", name)
        channel.subscribers.add(sub)
        try:
            await asyncio.wait_for(channel.confirmed.wait(), CONFIRM_TIMEOUT_S)
        except TimeoutError as exc:
            await self.unsubscribe(sub)
            raise DependencyUnavailable(
                "redis", f"subscription not confirmed in {CONFIRM_TIMEOUT_S:.0f}s"
            ) from exc
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
            await self._write("UNSUBSCRIBE", name)

    async def _write(self, command: str, name: bytes) -> None:
        # Write only on a ready connection; otherwise the reader's reconnect subscribes the
        # channels followed by then (and drops the others).
        async with self._lock:
            if not self._ready:
                return
            try:
                if command == "SUBSCRIBE":
                    await self._pubsub.subscribe(name)
                else:
                    await self._pubsub.unsubscribe(name)
            except (RedisError, OSError) as exc:
                logger.warning("event hub: %s failed, reconnecting: %s", command, exc)
                self._ready = False

    async def _connect(self) -> None:
        async with self._lock:
            self._ready = False
            with contextlib.suppress(RedisError, OSError):
                await self._pubsub.aclose()  # type: ignore[no-untyped-call]
            self._pubsub = self._client.pubsub()
            await self._pubsub.subscribe(self._anchor, *self._channels)
            self._ready = True

    async def _read(self) -> None:
        self._ready = False
        while True:
            if not self._ready:
                try:
                    await self._connect()
                except (RedisError, OSError) as exc:
                    logger.warning("event hub: cannot connect to redis: %s", exc)
                    await asyncio.sleep(RECONNECT_DELAY_S)
                    continue
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except (RedisError, OSError) as exc:
                logger.warning("event hub: redis connection lost: %s", exc)
                self._ready = False
                await asyncio.sleep(RECONNECT_DELAY_S)
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
                        sub.deliver(RESYNC)
                target.confirmed.set()
