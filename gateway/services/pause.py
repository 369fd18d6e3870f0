"""Pause and resume: a session gives up its container and gets a new one on the same volumes.

A paused session keeps everything but its container: the workspace and config volumes (so the
CLI's transcript, for ``--resume``), its events stream (so seq continues), its queued prompts
and its tree's counters. The next prompt — a chat, a WebSocket prompt, ``POST /resume``, or a
prompt left queued by a container that died — starts a new container whose wrapper finds the
transcript marker on the config volume and runs ``claude --resume=<id>``.

Both directions are conditional UPDATEs under the tree's lock, so a replica that loses a race
changes nothing:

    pause   idle -> paused  only while no turn is queued or running; then the container is
            stopped (its wrapper says ``exited``), recorded, removed, and ``container_id``
            cleared; a prompt that arrived meanwhile resumes the session at once
    resume  paused -> starting  only once ``container_id`` is cleared; the queued prompts are
            re-pushed from the database, in order; a new container starts with a new model
            credential; ``ready`` (resumed, ``resume_ms``) makes it idle again

A failure while resuming puts the session back to ``paused`` with nothing left running, and
the caller gets the error (503 naming the dependency).
"""

from __future__ import annotations

import secrets
import time

from sqlalchemy import exists, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Session, SessionStatus, Turn, TurnStatus, utcnow
from gateway.errors import AdmissionRefused, Conflict, GatewayError, NotFound
from gateway.services import admission, session_redis, tree
from gateway.services.metering.credentials import new_proxy_key
from gateway.services.provision import session_spec
from gateway.services.session_base import logger
from gateway.services.shutdown import Shutdown
from gateway.services.turns import TurnOps

OPEN_TURNS = (TurnStatus.QUEUED, TurnStatus.RUNNING)


class PauseResume(Shutdown, TurnOps):
    """Pause an idle session (idle timeout, or asked) and resume a paused one."""

    async def pause(
        self, *, db: AsyncSession, session: Session, reason: str = "requested"
    ) -> Session:
        """Release the container of an idle session; volumes, stream and prompts stay.

        Raises Conflict when the session is busy (a turn queued or running, or starting) or
        ended; pausing a paused session returns it unchanged."""
        if not await self.try_pause(session.id, session.root_id, reason=reason):
            current = await db.get(Session, session.id, populate_existing=True)
            if current is None:
                raise NotFound(f"session {session.id} not found")
            if current.status is SessionStatus.PAUSED:
                return current
            raise Conflict(
                f"session {session.id} is {current.status.value}"
                + (" with a turn queued or running" if current.status.live else "")
                + "; only an idle session can be paused"
            )
        await self.finish_pause(session.id)
        current = await db.get(Session, session.id, populate_existing=True)
        return current or session

    async def try_pause(
        self, sid: str, root_id: str, *, reason: str, idle_before: float | None = None
    ) -> bool:
        """Flip idle -> paused if no turn is queued or running (and, given ``idle_before``,
        the session has been inactive since that Unix time). True when this call flipped it."""
        now = utcnow()
        async with self.db_factory() as db:
            await tree.lock_tree(db, root_id)
            statement = (
                update(Session)
                .where(col(Session.id) == sid)
                .where(col(Session.status) == SessionStatus.IDLE)
                .where(
                    ~exists().where(col(Turn.session_id) == sid, col(Turn.status).in_(OPEN_TURNS))
                )
                .values(status=SessionStatus.PAUSED, paused_reason=reason, last_activity=now)
            )
            if idle_before is not None:
                cutoff = now.fromtimestamp(idle_before, now.tzinfo)
                statement = statement.where(col(Session.last_activity) < cutoff)
            flipped = (await db.exec(statement)).rowcount == 1
            await db.commit()
        if flipped:
            self.metrics.pauses.labels(reason).inc()
            logger.info("session %s paused (%s)", sid, reason)
        return flipped

    async def finish_pause(self, sid: str) -> None:
        """Stop, record and remove a paused session's container, clear ``container_id``, and
        resume at once if a prompt arrived meanwhile. Idempotent (a replica that finds it
        half-done — its predecessor died — completes it)."""
        async with self.db_factory() as db:
            session = await db.get(Session, sid)
        if session is None or session.status is not SessionStatus.PAUSED:
            return
        if session.container_id:
            info = await self.runtime.inspect(session.container_id)
            await self.runtime.stop(session.container_id, timeout_s=self.settings.stop_timeout_s)
            if info is not None:
                await self._await_recorded(sid)
            await self.runtime.remove(session.container_id)
        if self.egress is not None:
            await self.egress.stop(sid)
        await session_redis.revoke_access(self.redis, sid)
        async with self.db_factory() as db:
            await db.exec(
                update(Session)
                .where(col(Session.id) == sid)
                .where(col(Session.status) == SessionStatus.PAUSED)
                .values(container_id=None)
            )
            await db.commit()
        if await self.open_turns(sid):
            await self.resume_by_id(sid)

    async def open_turns(self, sid: str) -> list[Turn]:
        """The session's queued and running turns, oldest first."""
        async with self.db_factory() as db:
            rows = await db.exec(
                select(Turn)
                .where(col(Turn.session_id) == sid, col(Turn.status).in_(OPEN_TURNS))
                .order_by(col(Turn.created_at))
            )
            return list(rows.all())

    async def resume_by_id(self, sid: str) -> Session | None:
        """:meth:`resume` with a handle of its own (background callers)."""
        async with self.db_factory() as db:
            session = await db.get(Session, sid)
            if session is None:
                return None
            return await self.resume(db=db, session=session)

    async def resume(self, *, db: AsyncSession, session: Session) -> Session:
        """Start a new container for a paused session (``--resume`` of its transcript).

        Returns the session (``starting``; ``ready`` follows). A session already live is
        returned as is; one whose pause is still finishing is resumed by that pause. Raises
        AdmissionRefused (429) when there is no room for its container (it stays paused),
        Conflict when it has ended, DependencyUnavailable (503) when a dependency fails — the
        session is then paused again with nothing left running."""
        sid = session.id
        now = utcnow()
        proxy_key, key_hash = new_proxy_key()
        async with self.admission_guard:
            await admission.lock(db)
            await tree.lock_tree(db, session.root_id)
            waiting = await db.get(Session, sid, populate_existing=True)
            if (
                waiting is not None
                and waiting.status is SessionStatus.PAUSED
                and waiting.container_id is None
            ):
                try:
                    await admission.check_capacity(
                        db, waiting.owner, self.settings.admission_limits()
                    )
                except AdmissionRefused:
                    await db.rollback()
                    raise
            flipped = (
                await db.exec(
                    update(Session)
                    .where(col(Session.id) == sid)
                    .where(col(Session.status) == SessionStatus.PAUSED)
                    .where(col(Session.container_id).is_(None))
                    .values(
                        status=SessionStatus.STARTING,
                        resumed_at=now,
                        last_activity=now,
                        proxy_key_hash=key_hash,
                        queue_position=None,
                    )
                )
            ).rowcount == 1
            await db.commit()
        current = await db.get(Session, sid, populate_existing=True)
        if current is None:
            raise NotFound(f"session {sid} not found")
        if not flipped:
            if current.status.open:
                return current
            raise Conflict(f"session {sid} is {current.status.value}; create a new session")
        started = time.monotonic()
        try:
            await self.requeue_prompts(sid)
            spec = session_spec(self.settings, current, resumed_at=now.timestamp())
            name = f"ccgate-{sid}-{secrets.token_hex(3)}"
            await self._start_container(db, current, spec, proxy_key, name=name)
            self.ledger.track(sid)
        except BaseException:
            await self._undo_resume(sid)
            raise
        logger.info(
            "session %s resuming (%.0f ms to container start)",
            sid,
            (time.monotonic() - started) * 1000,
        )
        return current

    async def _undo_resume(self, sid: str) -> None:
        """Back to paused with no container, after a resume failed half-way."""
        async with self.db_factory() as db:
            session = await db.get(Session, sid)
            if session is None:
                return
            container = session.container_id
            await db.exec(
                update(Session)
                .where(col(Session.id) == sid)
                .where(col(Session.status).in_(tree.LIVE))
                .values(status=SessionStatus.PAUSED, container_id=None)
            )
            await db.commit()
        for step in (
            self.runtime.remove(container) if container else None,
            self.egress.stop(sid) if self.egress else None,
            session_redis.revoke_access(self.redis, sid),
        ):
            if step is None:
                continue
            try:
                await step
            except GatewayError as exc:
                logger.warning("resume of %s: cleanup step failed: %s", sid, exc)

    async def _resume_paused(self, sid: str) -> None:
        """A prompt was queued on a paused session: resume it (TurnOps.chat calls this)."""
        await self.resume_by_id(sid)
