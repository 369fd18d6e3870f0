"""Event publisher: assigns each event its seq and delivers it to Redis, in order, at least once.

Delivery of one event is a Lua script: XADD to the session's events stream with the explicit
entry id ``<seq>-0``, then PUBLISH the same envelope on the live channel. The wrapper never trims
the stream: the gateway's ledger trims it below what it has persisted.
A retried event whose id is already in the stream is recognised by Redis ("equal or smaller")
and neither appended nor published again, so retries after a lost reply never duplicate.

``emit`` journals the envelope in the outbox (outbox.py) and queues it; one sender task ships
the queue in pipelined batches and, while Redis is unreachable or refuses writes (``maxmemory``
reached, a restart), keeps everything and retries with backoff. Memory is bounded: past
``max_pending`` queued events, new ones are only journaled and the sender reads them back from
the outbox, in order, once it has caught up. A restarted wrapper resends what the outbox holds
undelivered.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import cast

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from wrapper.outbox import Outbox
from wrapper.protocol import (
    APPEND_AND_PUBLISH_SCRIPT,
    EventSource,
    encode_envelope,
    events_key,
    live_channel,
    seq_of_stream_id,
    stream_id,
)

logger = logging.getLogger(__name__)

_APPEND_AND_PUBLISH = APPEND_AND_PUBLISH_SCRIPT

_BATCH = 256


class EventPublisher:
    """Ordered, retrying publisher of event envelopes for one session.

    ``seq`` continues from the last entry already in the stream, so a restarted wrapper never
    reuses a seq. At most ``max_pending`` envelopes wait in memory; with an outbox, the rest
    wait in it (without one, emit keeps queueing: tests only).
    """

    def __init__(
        self,
        client: aioredis.Redis,
        session_id: str,
        *,
        outbox: Outbox | None = None,
        max_pending: int = 2000,
    ) -> None:
        self._redis = client
        self._session_id = session_id
        self._stream = events_key(session_id)
        self._channel = live_channel(session_id)
        self._max_pending = max_pending
        self._spill_from: int | None = None
        self._script = client.register_script(_APPEND_AND_PUBLISH)
        self._pending: deque[tuple[int, str]] = deque()
        self._wakeup = asyncio.Event()
        self._delivered = asyncio.Condition()
        self._last_seq = 0
        self._delivered_seq = 0
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._outbox = outbox

    @property
    def last_seq(self) -> int:
        """Seq of the most recently emitted event (0 before the first)."""
        return self._last_seq

    async def start(self) -> None:
        """Continue after the last seq of the stream and of the outbox (whichever is higher),
        queue what the outbox holds undelivered, then start the sender task."""
        journal_last, undelivered = self._outbox.recover() if self._outbox else (0, [])
        last = await self._redis.xrevrange(self._stream, count=1)
        stream_last = seq_of_stream_id(cast(bytes, last[0][0])) if last else 0
        self._last_seq = max(stream_last, journal_last)
        self._delivered_seq = undelivered[0][0] - 1 if undelivered else self._last_seq
        self._pending.extend(undelivered)
        if undelivered:
            self._wakeup.set()
        self._task = asyncio.create_task(self._run(), name="event-publisher")

    def emit(
        self,
        event_type: str,
        data_json: str,
        *,
        source: EventSource,
        turn_id: str | None,
    ) -> int:
        """Queue one event; returns its seq. ``data_json`` must be a JSON value, used verbatim."""
        self._last_seq += 1
        envelope = encode_envelope(
            seq=self._last_seq,
            session_id=self._session_id,
            turn_id=turn_id,
            event_type=event_type,
            data_json=data_json,
            source=source,
        )
        if self._outbox is not None:
            try:
                self._outbox.append(self._last_seq, envelope)
            except OSError as exc:
                # Keep publishing from memory so the failure itself can be reported.
                logger.error("outbox: cannot journal event %d: %s", self._last_seq, exc)
                self._outbox.close()
                self._outbox = None
                self.journal_error = str(exc)
                self._spill_from = None
        if self._outbox is not None and (
            self._spill_from is not None or len(self._pending) >= self._max_pending
        ):
            if self._spill_from is None:
                self._spill_from = self._last_seq
        else:
            self._pending.append((self._last_seq, envelope))
        self._wakeup.set()
        return self._last_seq

    journal_error: str | None = None
    """Why the outbox stopped journaling (disk full, ...); the runner ends the session."""

    @property
    def pending(self) -> int:
        """Events waiting for delivery (in memory or only in the outbox)."""
        return self._last_seq - self._delivered_seq

    async def flush(self, timeout_s: float) -> bool:
        """Wait until every queued event is delivered; False if the timeout ran out first."""
        target = self._last_seq

        async def _wait() -> None:
            async with self._delivered:
                await self._delivered.wait_for(lambda: self._delivered_seq >= target)

        try:
            await asyncio.wait_for(_wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float) -> None:
        """Flush within ``timeout_s`` seconds, then stop the sender."""
        await self.flush(timeout_s)
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def _run(self) -> None:
        backoff = 0.05
        while not self._closing:
            from_memory = bool(self._pending)
            if from_memory:
                batch = [self._pending[i] for i in range(min(_BATCH, len(self._pending)))]
            elif self._spill_from is not None and self._outbox is not None:
                batch = self._outbox.read_from(self._spill_from, _BATCH)
            else:
                batch = []
            if not batch:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            try:
                await self._send(batch)
            except (RedisError, OSError) as exc:
                # Unreachable, restarting, or refusing writes (OOM): everything stays queued.
                logger.warning("redis: %d events held: %s", self.pending, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                continue
            backoff = 0.05
            if from_memory:
                for _ in batch:
                    self._pending.popleft()
            elif batch[-1][0] >= self._last_seq:
                self._spill_from = None
            else:
                self._spill_from = batch[-1][0] + 1
            if self._outbox is not None:
                self._outbox.delivered(batch[-1][0])
            async with self._delivered:
                self._delivered_seq = batch[-1][0]
                self._delivered.notify_all()

    async def _send(self, batch: list[tuple[int, str]]) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            for seq, envelope in batch:
                await self._script(
                    keys=[self._stream, self._channel],
                    args=[stream_id(seq), envelope],
                    client=pipe,
                )
            await pipe.execute()
