"""Container deaths: noticed from Docker's event stream, and the session's stream closed.

A session container that dies without its wrapper's ``exited`` (OOM kill, ``docker kill``, an
engine restart, a wrapper crash) leaves its stream open: clients would wait for a turn that
never ends. Each replica follows the engine's ``die`` events (runtime ``deaths()``); for the
container a live session is running on, the gateway writes what the wrapper could not:

- ``turn_completed`` for the turn that was open (``subtype: error_<cause>``, ``is_error``,
  ``terminal_reason: container_<cause>``, ``outcome: <cause>``), when one was;
- ``exited {reason: crashed, cause, exit_code}``.

``cause`` is ``oom`` (Docker's ``State.OOMKilled``), ``killed`` (exit status 137: SIGKILL) or
``exited``. Both events are ``source: gateway`` with the gateway's signature (envelopes.py),
appended with the wrapper's own script at the next seqs, so every client sees them in order
and the ledger applies them like the wrapper's (the session is paused; lifecycle.py). Several
replicas may see the same death: the append refuses a seq that exists, so the stream is
closed once. A death the stream missed (the gateway was down, events were dropped) is found by
the reaper's sweep, which calls :meth:`DeathWatch.close` the same way.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Session
from gateway.errors import DependencyUnavailable
from gateway.metrics import Metrics
from gateway.services.envelopes import notice_key, sign_notice
from gateway.services.runtime import ContainerRuntime
from gateway.services.runtime.base import LABEL_HELPER, LABEL_POOL, LABEL_SESSION
from gateway.services.session_redis import notify, redis_errors
from wrapper.protocol import (
    APPEND_AND_PUBLISH_SCRIPT,
    CONTAINER_DEATH_REASONS,
    EventSource,
    EventType,
    TurnOutcome,
    decode_envelope,
    encode_envelope,
    events_key,
    live_channel,
    seq_of_stream_id,
    stream_id,
)

logger = logging.getLogger(__name__)

SIGKILL_STATUS = 137


def death_cause(exit_code: int | None, oom_killed: bool) -> TurnOutcome:
    """``oom``, ``killed`` (exit status 137) or ``exited``."""
    if oom_killed:
        return TurnOutcome.OOM
    if exit_code == SIGKILL_STATUS:
        return TurnOutcome.KILLED
    return TurnOutcome.EXITED


def closing_events(
    newest: dict[str, Any] | None, cause: TurnOutcome, exit_code: int | None
) -> list[tuple[str, str | None, dict[str, Any]]]:
    """What closes a stream whose newest envelope is ``newest``: [(type, turn_id, data)].

    Nothing when it already ends with ``exited``. Every envelope of a running turn carries
    its turn id and nothing follows ``turn_completed`` with it, so the newest envelope tells
    whether a turn is open."""
    if newest is not None and newest.get("type") == EventType.EXITED:
        return []
    events: list[tuple[str, str | None, dict[str, Any]]] = []
    turn_id = newest.get("turn_id") if newest is not None else None
    if isinstance(turn_id, str) and newest is not None:
        if newest.get("type") != EventType.TURN_COMPLETED:
            what = {
                TurnOutcome.OOM: "ran out of memory (OOM-killed)",
                TurnOutcome.KILLED: "was killed (SIGKILL)",
            }.get(cause, f"exited (status {exit_code})")
            events.append(
                (
                    EventType.TURN_COMPLETED.value,
                    turn_id,
                    {
                        "message_id": turn_id,
                        "subtype": f"error_{cause.value}",
                        "is_error": True,
                        "result": None,
                        "errors": [f"the session container {what} during the turn"],
                        "terminal_reason": CONTAINER_DEATH_REASONS[cause],
                        "outcome": cause.value,
                        "files": [],
                        "deleted_files": [],
                    },
                )
            )
    events.append(
        (
            EventType.EXITED.value,
            None,
            {
                "reason": "crashed",
                "cause": cause.value,
                "exit_code": exit_code,
                "cli_exit_code": None,
            },
        )
    )
    return events


class DeathWatch:
    """Follows container deaths and closes the streams of the sessions they ran."""

    def __init__(
        self,
        *,
        runtime: ContainerRuntime,
        redis: aioredis.Redis,
        db_factory: async_sessionmaker[AsyncSession],
        jwt_key: str,
        metrics: Metrics,
    ) -> None:
        self._runtime = runtime
        self._redis = redis
        self._db = db_factory
        self._key = notice_key(jwt_key)
        self._metrics = metrics
        self.on_pool_death: Callable[[], None] = lambda: None
        """Called when a warm-pool container dies (the pool manager replaces it at once)."""

    async def run(self) -> None:
        """Follow the engine's event stream forever (run it under the Supervisor: a lost
        stream raises DependencyUnavailable and is reopened with backoff; the reaper's sweep
        covers the gap)."""
        async for death in self._runtime.deaths():
            if death is None:
                logger.warning("container events were dropped; the reaper's sweep covers them")
                continue
            sid = death.labels.get(LABEL_SESSION)
            if not sid or LABEL_HELPER in death.labels:
                continue
            if LABEL_POOL in death.labels and death.action == "die":
                self.on_pool_death()  # unclaimed: the pool's; claimed: a session's as well
            if death.action == "oom":
                await self._report_oom(sid, death.container_id)
                continue
            try:
                await self.close(
                    sid, death.container_id, exit_code=death.exit_code, died_at=death.at
                )
            except DependencyUnavailable as exc:
                logger.warning("could not close the stream of %s: %s", sid, exc)

    async def close(
        self,
        sid: str,
        container_id: str,
        *,
        exit_code: int | None = None,
        died_at: float | None = None,
        gone: bool = False,
    ) -> bool:
        """Close the stream of session ``sid`` if ``container_id`` (dead, or ``gone``) was its
        live container and the wrapper did not say ``exited``. True when this call wrote."""
        async with self._db() as db:
            session = await db.get(Session, sid)
        if session is None or not session.status.live or session.container_id != container_id:
            return False
        oom = False
        if not gone:
            info = await self._runtime.inspect(container_id)
            if info is not None:
                oom = info.oom_killed
                exit_code = info.exit_code if info.exit_code is not None else exit_code
        cause = death_cause(exit_code, oom)
        wrote = await self._append(sid, cause, exit_code)
        if wrote:
            self._metrics.container_deaths.labels(cause.value).inc()
            if died_at:
                self._metrics.death_notice_seconds.observe(max(0.0, time.time() - died_at))
            logger.warning(
                "session %s: its container %s died (%s, status %s)",
                sid,
                container_id[:12],
                cause.value,
                exit_code,
            )
        return wrote

    async def _report_oom(self, sid: str, container_id: str) -> None:
        """A process of the session's container was OOM-killed (the container may live on: the
        kernel kills the largest process, usually the agent's tool): tell the session's
        clients with a ``container_oom`` event, relayed by its wrapper."""
        async with self._db() as db:
            session = await db.get(Session, sid)
        if session is None or not session.status.live or session.container_id != container_id:
            return
        self._metrics.container_ooms.inc()
        logger.warning("session %s: a process hit the memory limit and was killed", sid)
        message = (
            "a process in the session container reached the memory limit and was killed "
            "by the kernel (out of memory)"
        )
        try:
            await notify(
                self._redis, sid, EventType.CONTAINER_OOM, {"message": message}, key=self._key
            )
        except DependencyUnavailable as exc:
            logger.warning("could not report the OOM of %s: %s", sid, exc)

    async def _append(self, sid: str, cause: TurnOutcome, exit_code: int | None) -> bool:
        with redis_errors():
            tail = await self._redis.xrevrange(events_key(sid), count=1)
        newest: dict[str, Any] | None = None
        last_seq = 0
        if tail:
            entry_id, fields = cast(tuple[bytes, dict[bytes, bytes]], tail[0])
            last_seq = seq_of_stream_id(entry_id)
            raw = fields.get(b"e")
            try:
                newest = decode_envelope(raw) if raw is not None else None
            except ValueError:
                newest = None
        wrote = False
        for kind, turn_id, data in closing_events(newest, cause, exit_code):
            last_seq += 1
            signed = sign_notice(self._key, sid, kind, data)
            envelope = encode_envelope(
                seq=last_seq,
                session_id=sid,
                turn_id=turn_id,
                event_type=kind,
                data_json=json.dumps(signed),
                source=EventSource.GATEWAY,
            )
            with redis_errors():
                added = await self._redis.eval(
                    APPEND_AND_PUBLISH_SCRIPT,
                    2,
                    events_key(sid),
                    live_channel(sid),
                    stream_id(last_seq),
                    envelope,
                )
            if not added:
                return wrote  # another replica is closing it
            wrote = True
        return wrote
