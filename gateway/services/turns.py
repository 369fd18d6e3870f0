"""Turns: queue a prompt (refused atomically once the session ended), wait for its recorded
result without holding a database connection, read it, interrupt it."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import uuid
from typing import Any

from sqlalchemy import Integer, Select, bindparam, exists, insert, literal, true, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import (
    Session,
    SessionStatus,
    SpawnTree,
    Turn,
    TurnStatus,
    utcnow,
)
from gateway.errors import (
    AdmissionRefused,
    Conflict,
    GatewayError,
    NotFound,
    TurnTimeout,
)
from gateway.services import admission, session_redis, tree
from gateway.services.session_base import ServiceBase
from wrapper.protocol import ControlMessage, ControlType, TurnRequest


class TurnOps(ServiceBase):
    """Prompts, their results, waiting for them, interrupts."""

    async def chat(
        self,
        *,
        db: AsyncSession,
        session: Session,
        prompt: str,
        timeout_s: float | None,
        queue: bool = False,
    ) -> Turn:
        """Queue a prompt (also while starting or running: turns run in arrival order); on a
        paused session, resume it (a new container continues the conversation).

        The turn is inserted only if the session is still open (one UPDATE checks and touches
        it under the tree's lock), so a concurrent stop either sees it (and cancels it) or
        refuses it (Conflict): no turn is left queued forever. A paused or queued session's
        prompt is not pushed to Redis here: its start re-pushes every queued turn from the
        database, in order. A paused session that has no room to resume (AdmissionRefused,
        429) keeps the prompt only with ``queue`` (it resumes when room frees); a user over
        ``max_active_turns_per_user`` is refused the same way.
        """
        limits = self.settings.admission_limits()
        turn = Turn(id=str(uuid.uuid4()), session_id=session.id, prompt=prompt)
        turn.timeout_s = timeout_s
        await tree.lock_tree(db, session.root_id)
        now = utcnow()
        # One statement checks the session is open, touches it and reads its status under the
        # tree's lock: a pause either committed before (paused) or waits for us (and then sees
        # this turn and does not pause); a stop either sees the turn or we see it ended.
        status = (
            await db.exec(
                update(Session)
                .where(col(Session.id) == session.id, col(Session.status).in_(tree.OPEN))
                .values(last_activity=now)
                .returning(col(Session.status))
            )
        ).scalar_one_or_none()
        if status is None:
            await db.rollback()
            current = await db.get(Session, session.id, populate_existing=True)
            state = current.status.value if current else "deleted"
            raise Conflict(f"session {session.id} is {state}; create a new session to chat")
        # The user's active-prompt limit is checked by the insert itself (no extra round
        # trip); only a refusal counts again, to say how many.
        added = await db.exec(
            insert(Turn).from_select(
                ["id", "session_id", "prompt", "status", "created_at", "timeout_s"],
                sa_select(
                    literal(turn.id, _TURN.c.id.type),
                    literal(session.id, _TURN.c.session_id.type),
                    literal(prompt, _TURN.c.prompt.type),
                    literal(TurnStatus.QUEUED, _TURN.c.status.type),
                    literal(now, _TURN.c.created_at.type),
                    literal(timeout_s, _TURN.c.timeout_s.type),
                ).where(admission.turns_below_limit(session.owner, limits)),
            )
        )
        if added.rowcount != 1:
            await db.rollback()
            await admission.check_turns(db, session.owner, limits)
            raise AdmissionRefused(
                "you have reached the maximum of prompts queued or running per user "
                f"(CCGATE_MAX_ACTIVE_TURNS_PER_USER={limits.max_active_turns_per_user})",
                limit="max_active_turns_per_user",
                retry_after_s=limits.retry_after_s,
            )
        await db.commit()
        turn.created_at = now
        await self._deliver(db, turn, SessionStatus(status), queue=queue)
        return turn

    async def chat_as_owner(
        self,
        *,
        db: AsyncSession,
        owner: str,
        session_id: str,
        prompt: str,
        timeout_s: float | None,
        queue: bool = False,
    ) -> Turn | None:
        """:meth:`chat` for the session's owner in one PostgreSQL statement, or None when it
        was not taken here (SQLite, another user's or an unknown session, an ended one, the
        user's prompt limit reached): the caller then authorizes and calls :meth:`chat`, which
        says why.

        A prompt costs one round trip on an autocommit connection (after the pool's ping)
        instead of about a dozen: the statement takes the tree's lock, checks ownership, the
        session's state and the prompt limit, touches the session and inserts the turn, with
        the same locking as :meth:`chat` (the tree's row lock first, then the session's row,
        whose status PostgreSQL re-checks at its latest version after a wait).
        """
        limits = self.settings.admission_limits()
        turn = Turn(id=str(uuid.uuid4()), session_id=session_id, prompt=prompt)
        turn.timeout_s = timeout_s
        now = utcnow()
        limit = limits.max_active_turns_per_user
        params = {
            "chat_session": session_id,
            "chat_owner": owner,
            "chat_turn_limit": limit,
            "chat_turn": turn.id,
            "chat_prompt": prompt,
            "chat_status": TurnStatus.QUEUED,
            "chat_now": now,
            "chat_timeout_s": timeout_s,
        }
        async with self.db_factory() as quick:
            if quick.get_bind().dialect.name != "postgresql":
                return None
            conn = await quick.connection(execution_options={"isolation_level": "AUTOCOMMIT"})
            result = await conn.execute(_chat_statement(bool(limit)), params)
            status: str | None = result.scalar_one_or_none()
        if status is None:
            return None
        turn.created_at = now
        await self._deliver(db, turn, SessionStatus(status), queue=queue)
        return turn

    async def _deliver(
        self, db: AsyncSession, turn: Turn, status: SessionStatus, *, queue: bool
    ) -> None:
        """Hand a committed turn to its session: push it to a live session's input, resume a
        paused one (AdmissionRefused unless ``queue``), or wake the lifecycle loop for a queued
        one. A failure removes the turn and raises."""
        session_id = turn.session_id
        try:
            if status is SessionStatus.QUEUED:
                self.wake_lifecycle(session_id)
            elif status is SessionStatus.PAUSED:
                try:
                    await self._resume_paused(session_id)
                except AdmissionRefused:
                    if not queue:
                        raise
                    self.wake_lifecycle(session_id)
            else:
                await session_redis.push_turn(
                    self.redis,
                    session_id,
                    TurnRequest(turn.id, turn.prompt, timeout_seconds=turn.timeout_s),
                )
        except GatewayError:
            with contextlib.suppress(SQLAlchemyError):
                await db.exec(delete(Turn).where(col(Turn.id) == turn.id))
                await db.commit()
            raise

    async def requeue_prompts(self, sid: str) -> None:
        """Rebuild the session's input list from its queued turns, oldest first, each with
        its own deadline (a new container takes them from there)."""
        async with self.db_factory() as db:
            rows = await db.exec(
                select(Turn)
                .where(col(Turn.session_id) == sid, col(Turn.status) == TurnStatus.QUEUED)
                .order_by(col(Turn.created_at))
            )
            turns = list(rows.all())
        await session_redis.requeue_turns(
            self.redis, sid, [TurnRequest(t.id, t.prompt, t.timeout_s) for t in turns]
        )

    async def _resume_paused(self, sid: str) -> None:
        """Resume a paused session whose prompt was just queued (pause.py overrides this)."""
        raise NotImplementedError

    async def latest_turn(self, *, session: Session) -> Turn:
        """The session's most recent prompt (own short-lived handle); Conflict when none."""
        async with self.db_factory() as db:
            rows = await db.exec(
                select(Turn)
                .where(Turn.session_id == session.id)
                .order_by(col(Turn.created_at).desc())
                .limit(1)
            )
            turn = rows.first()
        if turn is None:
            raise Conflict(f"session {session.id} has no turn to wait for")
        return turn

    async def wait_for_turn(self, *, session_id: str, turn_id: str, timeout_s: float) -> Turn:
        """Wait until the turn is final and recorded (result and artifacts), without holding a
        database connection: it wakes on the session's ``turn_recorded`` notices (and ``exited``
        events), with a slow re-check as a safety net. Raises TurnTimeout or NotFound."""
        sub = await self.hub.subscribe(session_id, accept=_wakes_waiters)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        try:
            while True:
                async with self.db_factory() as db:
                    current = await db.get(Turn, turn_id)
                if current is None:
                    raise NotFound(f"message {turn_id} not found")
                if current.status.final and current.recorded_at is not None:
                    return current
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TurnTimeout(
                        f"turn {turn_id} is still {current.status.value} after {timeout_s:g}s; "
                        f"poll GET /api/v1/sessions/{session_id}/messages/{turn_id}"
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(sub.get(), min(remaining, _WAIT_RECHECK_S))
                    if sub.overflowed:
                        await self.hub.unsubscribe(sub)
                        sub = await self.hub.subscribe(session_id, accept=_wakes_waiters)
        finally:
            await self.hub.unsubscribe(sub)

    async def get_message(self, *, db: AsyncSession, session: Session, message_id: str) -> Turn:
        """A turn of this session; NotFound otherwise."""
        turn = await db.get(Turn, message_id)
        if turn is None or turn.session_id != session.id:
            raise NotFound(f"message {message_id} not found in session {session.id}")
        return turn

    async def interrupt(self, *, session: Session) -> None:
        """Ask the wrapper to interrupt the running turn (CLI control-protocol interrupt).

        The wrapper kills the CLI if no result follows within ``interrupt_grace_s``; the
        lifecycle loop kills the container if the turn is still open 5 s after that (the
        running turn's ``interrupt_requested_at`` marks the request). Conflict unless live."""
        if not session.status.live:
            raise Conflict(f"session {session.id} is {session.status.value}; nothing to interrupt")
        async with self.db_factory() as db:
            await db.exec(
                update(Turn)
                .where(col(Turn.session_id) == session.id)
                .where(col(Turn.status) == TurnStatus.RUNNING)
                .where(col(Turn.interrupt_requested_at).is_(None))
                .values(interrupt_requested_at=utcnow())
            )
            await db.commit()
        await session_redis.push_control(
            self.redis, session.id, ControlMessage(type=ControlType.INTERRUPT)
        )


_WAIT_RECHECK_S = 5.0
_TURN: Any = Turn.__table__  # type: ignore[attr-defined]
_SESSION: Any = Session.__table__  # type: ignore[attr-defined]


@functools.cache
def _chat_statement(limited: bool) -> Select[str]:
    """PostgreSQL, built once (``limited``: with the user's prompt limit): lock the session's
    tree, touch the session if ``:chat_owner`` owns it, it is open and the owner is below
    ``:chat_turn_limit``, and insert the turn; returns the session's status (one row), or no
    row and nothing written. Parameters (none named like a session column: an UPDATE takes
    those as values to SET): chat_session, chat_owner, chat_turn_limit, chat_turn,
    chat_prompt, chat_status, chat_now, chat_timeout_s.

    Data-modifying CTEs always run to completion. The UPDATE's uncorrelated EXISTS on the lock
    is a one-time filter, evaluated before the UPDATE scans, so the locks are taken in the
    order every other writer of a tree takes them (tree.py): the tree's row, then the
    session's.
    """
    session_id = bindparam("chat_session", type_=_SESSION.c.id.type)
    owner = bindparam("chat_owner", type_=_SESSION.c.owner.type)
    now = bindparam("chat_now", type_=_TURN.c.created_at.type)
    root = sa_select(col(Session.root_id)).where(col(Session.id) == session_id)
    locked = (
        sa_select(col(SpawnTree.root_id))
        .where(col(SpawnTree.root_id) == root.scalar_subquery())
        .with_for_update()
        .cte("locked")
    )
    conditions = [
        col(Session.id) == session_id,
        col(Session.owner) == owner,
        col(Session.status).in_(tree.OPEN),
        exists(sa_select(locked.c.root_id)),
    ]
    if limited:
        conditions.append(
            admission.active_turns_below(owner, bindparam("chat_turn_limit", type_=Integer()))
        )
    touched = (
        update(Session)
        .where(*conditions)
        .values(last_activity=now)
        .returning(col(Session.status))
        .cte("touched")
    )
    added = (
        insert(Turn)
        .from_select(
            ["id", "session_id", "prompt", "status", "created_at", "timeout_s"],
            sa_select(
                bindparam("chat_turn", type_=_TURN.c.id.type),
                session_id,
                bindparam("chat_prompt", type_=_TURN.c.prompt.type),
                bindparam("chat_status", type_=_TURN.c.status.type),
                now,
                bindparam("chat_timeout_s", type_=_TURN.c.timeout_s.type),
            ).select_from(touched),
        )
        .returning(col(Turn.id))
        .cte("added")
    )
    return sa_select(touched.c.status).select_from(touched.join(added, true()))


def _wakes_waiters(raw: bytes) -> bool:
    """Messages a turn waiter needs: gateway notices (no seq) and ``exited`` events."""
    return not raw.startswith(b'{"seq":') or b'"type":"exited"' in raw
