"""What the ledger does after a lifecycle commit: metrics, ``turn_recorded``, collection and
release jobs, the parent's ``child_*`` event and the child's callback.

All of it is best effort after the commit (the database is the truth): Redis down -> logged,
the notice or child event is lost (waiters re-check on their own); a callback receiver slow or
down -> retried in the background (callbacks.py), at most ``max_callbacks`` in flight, past which
new ones are dropped with a warning rather than queued without bound.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.models import Session
from gateway.errors import DependencyUnavailable
from gateway.metrics import Metrics
from gateway.services.callbacks import post_callback
from gateway.services.envelopes import notice_key
from gateway.services.ledger.collector import ArtifactCollector, Job
from gateway.services.ledger.lifecycle import Applied
from gateway.services.session_redis import announce_turn_recorded, notify
from wrapper.protocol import EventType

logger = logging.getLogger("gateway.services.ledger.reader")


class FollowUps:
    """Runs an :class:`Applied`'s follow-ups; owns the in-flight callback tasks."""

    def __init__(
        self,
        *,
        settings: Settings,
        redis: aioredis.Redis,
        db_factory: async_sessionmaker[AsyncSession],
        metrics: Metrics,
        collector: ArtifactCollector,
        max_callbacks: int = 256,
    ) -> None:
        self._settings = settings
        self._notice_key = notice_key(settings.jwt_key())  # read once, not per notice
        self._redis = redis
        self._db = db_factory
        self._metrics = metrics
        self._collector = collector
        self._max_callbacks = max_callbacks
        self._callbacks: set[asyncio.Task[None]] = set()
        self.on_paused: Callable[[str], None] = lambda sid: None
        """Told of each session a container death paused (set by the gateway at start)."""

    async def run(self, sid: str, applied: Applied) -> None:
        """Every follow-up of one committed lifecycle event of session ``sid``."""
        if applied.finished is not None:
            turn = applied.finished
            self._metrics.turns.labels(outcome=turn.status.value).inc()
        if applied.resumed_s is not None:
            self._metrics.resume_seconds.observe(applied.resumed_s)
        if applied.paused:
            self.on_paused(sid)
        if applied.recorded_turn is not None:
            try:
                await announce_turn_recorded(self._redis, sid, applied.recorded_turn)
            except DependencyUnavailable as exc:
                logger.warning("ledger: could not announce %s: %s", applied.recorded_turn, exc)
        if applied.collect_turn is not None:
            self._collector.submit(Job(sid, turn_id=applied.collect_turn))
        if applied.release_container is not None:
            self._collector.submit(Job(sid, release_container=applied.release_container))
        if applied.tell_parent is not None:
            await self._tell_parent(sid, *applied.tell_parent)

    async def _tell_parent(self, sid: str, event: EventType, payload: dict[str, Any]) -> None:
        """child_* event in the parent's stream, and the child's callback."""
        async with self._db() as db:
            child = await db.get(Session, sid)
        if child is None:
            return
        if child.parent_session_id:
            try:
                await notify(
                    self._redis,
                    child.parent_session_id,
                    event,
                    payload,
                    key=self._notice_key,
                )
            except DependencyUnavailable as exc:
                logger.warning("ledger: could not tell %s: %s", child.parent_session_id, exc)
        if child.callback_url:
            if len(self._callbacks) >= self._max_callbacks:
                logger.warning("callback to %s dropped: too many in flight", child.callback_url)
                return
            task = asyncio.create_task(
                post_callback(
                    child.callback_url, event, payload, allowed=self._settings.callback_networks
                )
            )
            self._callbacks.add(task)
            task.add_done_callback(self._callbacks.discard)

    def close(self) -> None:
        """Cancel the callbacks in flight."""
        for task in list(self._callbacks):
            task.cancel()
