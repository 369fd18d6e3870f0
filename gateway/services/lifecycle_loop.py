"""The lifecycle loop: what happens to sessions with time, not requests.

Every ``lifecycle_interval_s`` (or at once when woken: a container death paused a session),
the replica holding the ``lifecycle:<deployment>`` lease (lease.py) runs one :meth:`tick`:

1. **admit** waiting sessions in a fair order (admission.py: round-robin over users, oldest
   first): queued ones are started; paused ones with prompts waiting (a container died under
   queued prompts, a chat arrived while the pause finished, or one asked to queue) — and, with
   ``crash_restart=always``, every session a death paused, within ``max_crash_resumes`` — are
   resumed. A per-user limit skips that user; a deployment limit ends the pass. Those still
   waiting get their ``queue_position`` (on the row, and a ``queue_position`` notice when it
   changes);
2. **finish pauses** whose replica died half-way (paused, container still recorded);
3. **pause idle sessions** whose ``idle_timeout_s`` (or the deployment's default) has passed
   since their last activity — never one with a turn queued or running (pause.py);
4. **stop expired sessions** (``expires_at`` passed), busy or not: their lifetime is a limit;
5. **kill containers** whose running turn ignored an interrupt for ``interrupt_grace_s`` + 5 s
   (the wrapper kills a deaf CLI itself; this covers a wrapper that is stuck too) — the death
   is then reported like any other (container_deaths.py: the turn ends ``killed``);
6. **flag silent turns**: a running turn whose stream has had no event for
   ``turn_silence_s`` gets a ``turn_silent`` notice and a metric (once per turn).

Pauses and stops run at most ``_CONCURRENCY`` at a time. A dependency down skips the rest of a
tick (logged); the next tick retries. Everything it changes goes through the same conditional
updates as the API, so a replica that has just lost the lease cannot double anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta

from redis.exceptions import RedisError
from sqlalchemy import and_, exists, false, func, or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from gateway.config import Settings
from gateway.db.errors import is_outage
from gateway.db.models import Session, SessionStatus, Turn, TurnStatus, as_utc, utcnow
from gateway.errors import AdmissionRefused, DependencyUnavailable, GatewayError
from gateway.services import session_redis
from gateway.services.admission import fair_order
from gateway.services.lease import Lease
from gateway.services.pause import OPEN_TURNS
from gateway.services.sessions import SessionService
from gateway.services.tree import OPEN
from wrapper.protocol import events_key

logger = logging.getLogger(__name__)

_CONCURRENCY = 8
_CRASH_CAUSES = ("oom", "killed", "exited", "crashed")
_KILL_MARGIN_S = 5.0


class LifecycleLoop:
    """Idle pauses, lifetimes, resumes, interrupt escalation and the silence watchdog."""

    def __init__(self, service: SessionService, lease: Lease) -> None:
        self._service = service
        self._settings: Settings = service.settings
        self._lease = lease
        self._woken = asyncio.Event()
        self._flagged: OrderedDict[str, None] = OrderedDict()

    def wake(self, session_id: str) -> None:
        """Run a tick now (a container death paused ``session_id``)."""
        self._woken.set()

    async def run(self) -> None:
        """Tick forever (run it under the Supervisor). Outages skip a tick; bugs propagate.
        The lease is given up when the loop ends, so another replica takes over at once."""
        try:
            await self._loop()
        finally:
            with contextlib.suppress(Exception):
                await self._lease.release()

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._woken.wait(), self._settings.lifecycle_interval_s)
            except TimeoutError:
                pass
            self._woken.clear()
            try:
                if await self._lease.acquire():
                    await self.tick()
            except (DependencyUnavailable, RedisError, OSError) as exc:
                logger.warning("lifecycle: tick skipped: %s", exc)
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise
                logger.warning("lifecycle: tick skipped, database unavailable: %s", exc)

    async def tick(self) -> dict[str, int]:
        """One pass over every rule; returns how many sessions each touched."""
        return {
            "admitted": await self._admit_waiting(),
            "pauses_finished": await self._bounded(
                self._service.finish_pause, await self._half_paused()
            ),
            "paused": await self._bounded(self._pause_if_idle, await self._idle()),
            "expired": await self._bounded(self._expire, await self._expired()),
            "killed": await self._bounded(self._kill_deaf, await self._deaf()),
            "flagged": await self._flag_silent(),
        }

    async def _bounded(self, action: Callable[[str], Awaitable[object]], ids: list[str]) -> int:
        semaphore = asyncio.Semaphore(_CONCURRENCY)
        done = 0

        async def one(sid: str) -> None:
            nonlocal done
            async with semaphore:
                try:
                    if await action(sid) is not False:
                        done += 1
                except GatewayError as exc:
                    logger.warning("lifecycle: %s on %s failed: %s", action.__name__, sid, exc)

        await asyncio.gather(*(one(sid) for sid in ids))
        return done

    # ------------------------------------------------------------------------- queries

    async def _waiting(self) -> list[tuple[str, str, bool]]:
        """Sessions waiting for a container, in admission order: (id, owner, is queued)."""
        always = self._settings.crash_restart == "always"
        prompt_waits = exists().where(
            col(Turn.session_id) == col(Session.id), col(Turn.status).in_(OPEN_TURNS)
        )
        crashed = col(Session.paused_reason).in_(_CRASH_CAUSES) if always else false()
        async with self._service.db_factory() as db:
            # Only the paused sessions something waits for: thousands of idle-paused ones
            # cost nothing here.
            rows = await db.exec(
                select(Session).where(
                    or_(
                        col(Session.status) == SessionStatus.QUEUED,
                        and_(
                            col(Session.status) == SessionStatus.PAUSED,
                            col(Session.container_id).is_(None),
                            or_(prompt_waits, crashed),
                        ),
                    )
                )
            )
            candidates = list(rows.all())
            paused = [c.id for c in candidates if c.status is SessionStatus.PAUSED]
            prompted: dict[str, datetime] = {}
            if paused:
                first = await db.exec(
                    select(Turn.session_id, func.min(Turn.created_at))
                    .where(col(Turn.session_id).in_(paused), col(Turn.status).in_(OPEN_TURNS))
                    .group_by(col(Turn.session_id))
                )
                prompted = dict(first.all())
        waiting: list[tuple[datetime, str, tuple[str, str, bool]]] = []
        for c in candidates:
            since: datetime | None = None
            if c.status is SessionStatus.QUEUED:
                since = c.created_at
            elif c.id in prompted:
                since = prompted[c.id]
            elif (
                always
                and c.paused_reason in _CRASH_CAUSES
                and c.crashes <= self._settings.max_crash_resumes
            ):
                since = c.last_activity
            if since is not None:
                item = (c.id, c.owner, c.status is SessionStatus.QUEUED)
                waiting.append((as_utc(since) or utcnow(), c.owner, item))
        waiting.sort(key=lambda w: w[0])
        return fair_order([(owner, item) for _, owner, item in waiting])

    async def _admit_waiting(self) -> int:
        """Start or resume waiting sessions while there is room; number the rest."""
        admitted = 0
        still: list[str] = []
        blocked: set[str] = set()  # owners at their own limit
        full = False
        for sid, owner, queued in await self._waiting():
            if full or owner in blocked:
                still.append(sid)
                continue
            try:
                if queued:
                    done = await self._service.start_queued(sid)
                else:
                    done = await self._service.resume_by_id(sid) is not None
                admitted += int(done)
            except AdmissionRefused as exc:
                still.append(sid)
                if exc.limit.endswith("_per_user"):
                    blocked.add(owner)
                else:
                    full = True  # the deployment is full: nobody else gets in this pass
            except GatewayError as exc:
                logger.warning("lifecycle: could not start %s: %s", sid, exc)
                still.append(sid)
        await self._number(still)
        return admitted

    async def _number(self, waiting: list[str]) -> None:
        """Record each waiting session's 1-based place; tell its clients when it changed."""
        async with self._service.db_factory() as db:
            rows = await db.exec(
                select(Session.id, Session.queue_position).where(
                    or_(col(Session.id).in_(waiting), col(Session.queue_position).is_not(None))
                )
            )
            known = dict(rows.all())
            changed: list[tuple[str, int]] = []
            for sid, old in known.items():
                position = waiting.index(sid) + 1 if sid in waiting else None
                if position != old:
                    await db.exec(
                        update(Session)
                        .where(col(Session.id) == sid)
                        .values(queue_position=position)
                    )
                    if position is not None:
                        changed.append((sid, position))
            await db.commit()
        for sid, position in changed:
            await session_redis.announce_queue_position(self._service.redis, sid, position)

    async def _half_paused(self) -> list[str]:
        s = self._settings
        cutoff = utcnow() - timedelta(seconds=s.stop_timeout_s + s.stop_record_timeout_s + 30)
        async with self._service.db_factory() as db:
            rows = await db.exec(
                select(Session.id).where(
                    col(Session.status) == SessionStatus.PAUSED,
                    col(Session.container_id).is_not(None),
                    col(Session.last_activity) < cutoff,
                )
            )
            return list(rows.all())

    async def _idle(self) -> list[str]:
        now = utcnow()
        default = self._settings.session_idle_timeout_s
        async with self._service.db_factory() as db:
            rows = await db.exec(
                select(Session.id, Session.last_activity, Session.idle_timeout_s).where(
                    col(Session.status) == SessionStatus.IDLE
                )
            )
            found = []
            for sid, last, timeout in rows.all():
                limit = default if timeout is None else timeout
                if limit and (as_utc(last) or now) < now - timedelta(seconds=limit):
                    found.append(sid)
            return found

    async def _expired(self) -> list[str]:
        async with self._service.db_factory() as db:
            rows = await db.exec(
                select(Session.id).where(
                    col(Session.status).in_(OPEN),
                    col(Session.expires_at).is_not(None),
                    col(Session.expires_at) < utcnow(),
                )
            )
            return list(rows.all())

    async def _deaf(self) -> list[str]:
        wait = self._settings.interrupt_grace_s + _KILL_MARGIN_S
        async with self._service.db_factory() as db:
            rows = await db.exec(
                select(Turn.session_id).where(
                    col(Turn.status) == TurnStatus.RUNNING,
                    col(Turn.interrupt_requested_at) < utcnow() - timedelta(seconds=wait),
                )
            )
            return sorted(set(rows.all()))

    # ------------------------------------------------------------------------- actions

    async def _pause_if_idle(self, sid: str) -> bool:
        async with self._service.db_factory() as db:
            session = await db.get(Session, sid)
        if session is None:
            return False
        limit = (
            self._settings.session_idle_timeout_s
            if session.idle_timeout_s is None
            else session.idle_timeout_s
        )
        if not await self._service.try_pause(
            sid, session.root_id, reason="idle", idle_before=time.time() - limit
        ):
            return False
        await self._service.finish_pause(sid)
        return True

    async def _expire(self, sid: str) -> bool:
        async with self._service.db_factory() as db:
            session = await db.get(Session, sid)
            if session is None or not session.status.open:
                return False
            lifetime = (as_utc(session.expires_at) or utcnow()) - (
                as_utc(session.created_at) or utcnow()
            )
            await db.exec(
                update(Session)
                .where(col(Session.id) == sid)
                .values(
                    error=f"the session reached its maximum lifetime "
                    f"({int(lifetime.total_seconds())} s)"
                )
            )
            await db.commit()
            logger.info("lifecycle: session %s reached its maximum lifetime; stopping", sid)
            await self._service.stop(db=db, session=session)
        return True

    async def _kill_deaf(self, sid: str) -> bool:
        async with self._service.db_factory() as db:
            session = await db.get(Session, sid)
        if session is None or not session.status.live or not session.container_id:
            return False
        logger.warning("lifecycle: session %s ignored an interrupt; killing its container", sid)
        await self._service.runtime.kill(session.container_id)
        return True

    async def _flag_silent(self) -> int:
        """``turn_silent`` notices for running turns whose stream has been quiet too long."""
        silence = self._settings.turn_silence_s
        async with self._service.db_factory() as db:
            rows = await db.exec(
                select(Turn.id, Turn.session_id, Turn.started_at).where(
                    col(Turn.status) == TurnStatus.RUNNING,
                    col(Turn.started_at) < utcnow() - timedelta(seconds=silence),
                )
            )
            running = list(rows.all())
        flagged = 0
        redis = self._service.redis
        for turn_id, sid, _started in running:
            if turn_id in self._flagged:
                continue
            with session_redis.redis_errors():
                tail = await redis.xrevrange(events_key(sid), count=1)
            newest_ts = _ts_of(tail)
            quiet = time.time() - newest_ts if newest_ts is not None else silence
            if quiet < silence:
                continue
            self._flagged[turn_id] = None
            while len(self._flagged) > 10_000:
                self._flagged.popitem(last=False)
            self._service.metrics.silent_turns.inc()
            logger.warning("lifecycle: turn %s of %s silent for %.0f s", turn_id, sid, quiet)
            await session_redis.announce_turn_silent(redis, sid, turn_id, quiet)
            flagged += 1
        return flagged


def _ts_of(tail: object) -> float | None:
    """``ts`` of the newest envelope of an XREVRANGE reply (None when there is none)."""
    if not isinstance(tail, list) or not tail:
        return None
    _, fields = tail[0]
    raw = fields.get(b"e") if isinstance(fields, dict) else None
    try:
        ts = json.loads(raw)["ts"] if raw else None
    except (ValueError, KeyError, TypeError):
        return None
    return float(ts) if isinstance(ts, int | float) else None
