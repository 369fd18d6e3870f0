"""Stop and delete: containers stopped for real after their last turn is recorded, subtrees
cascaded (children admitted meanwhile included), rows and keys removed on delete."""

from __future__ import annotations

import asyncio
import time

from sqlalchemy import func
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import (
    Artifact,
    DeadLetter,
    Event,
    Session,
    SessionStatus,
    SpawnTree,
    Turn,
    TurnStatus,
    utcnow,
)
from gateway.services import family, session_redis, tree
from gateway.services.provision import Provisioning
from gateway.services.runtime import ContainerState
from gateway.services.session_base import logger
from wrapper.protocol import EventType


class Shutdown(Provisioning):
    """Stop and delete, over a whole subtree."""

    async def stop(self, *, db: AsyncSession, session: Session) -> Session:
        """Stop the session and its whole subtree, children first.

        Each container is stopped for real (SIGTERM, grace, SIGKILL); the wrapper ends a running
        turn (``interrupted``) and says ``exited``; the stop waits (at most
        ``stop_record_timeout_s``) until the ledger has recorded that turn and copied its files,
        then removes the container. Prompts that never ran are cancelled. Volumes stay.
        Children admitted while the stop ran are stopped too. Idempotent.
        """
        await self._stop_children(db, session)
        current = await db.get(Session, session.id, populate_existing=True)
        if current is None or not current.status.open:
            return current or session
        session = current
        session.last_activity = utcnow()  # the reaper leaves recently active sessions alone
        db.add(session)
        await db.commit()
        if session.container_id:
            info = await self.runtime.inspect(session.container_id)
            await self.runtime.stop(session.container_id, timeout_s=self.settings.stop_timeout_s)
            if info is not None and info.state is ContainerState.RUNNING:
                # Only a wrapper that was alive says ``exited``; a dead one has nothing to record.
                await self._await_recorded(session.id)
            await self.runtime.remove(session.container_id)
        if self.egress is not None:
            await self.egress.stop(session.id)
        await session_redis.drain_turns(self.redis, session.id)
        await session_redis.revoke_access(self.redis, session.id)
        await tree.lock_tree(db, session.root_id)
        # Status first: from here a concurrent chat is refused (its conditional insert waits
        # for this transaction), and every turn it already inserted is seen and cancelled.
        ended = await tree.end_session(db, session, SessionStatus.STOPPED)
        await tree.cancel_open_turns(db, session.id)
        await db.commit()
        await self._stop_children(db, session)
        if ended and session.parent_session_id:
            await self._notify(
                session.parent_session_id, EventType.CHILD_STOPPED, {"child_session_id": session.id}
            )
        return session

    async def _stop_children(self, db: AsyncSession, session: Session) -> None:
        for child in await family.children_of(db, session.id):
            if child.status.open:
                await self.stop(db=db, session=child)

    async def _await_recorded(self, session_id: str) -> None:
        """Wait until the ledger has persisted everything the stopped container published (its
        stream has no unread or unacknowledged entry) and copied every finished turn's files.

        The container is stopped, so nothing more arrives: this does not depend on the wrapper
        having said ``exited`` (a killed one never does)."""
        deadline = time.monotonic() + self.settings.stop_record_timeout_s
        while time.monotonic() < deadline:
            backlog = await session_redis.unpersisted(self.redis, session_id)
            async with self.db_factory() as db:
                collecting = (
                    await db.exec(
                        select(func.count())
                        .select_from(Turn)
                        .where(
                            Turn.session_id == session_id,
                            col(Turn.status).not_in([TurnStatus.QUEUED, TurnStatus.RUNNING]),
                            col(Turn.recorded_at).is_(None),
                        )
                    )
                ).one()
            if not backlog and not collecting:
                return
            await asyncio.sleep(0.05)
        logger.warning("stop: the ledger had not recorded %s in time; removing anyway", session_id)

    async def delete(self, *, db: AsyncSession, session: Session) -> None:
        """Delete the session and its subtree: containers, own volumes, Redis keys, artifacts,
        events, turns and rows. A deleted child is detached from its parent."""
        for child in await family.children_of(db, session.id):
            await self.delete(db=db, session=child)
        session = await self.stop(db=db, session=session)
        self.ledger.untrack(session.id)
        await self._remove_resources(session, quiet=False)
        await session_redis.purge(self.redis, session.id)
        await self.store.delete_session(session.id)
        await delete_rows(db, session)
        await db.commit()


async def delete_rows(db: AsyncSession, session: Session) -> None:
    """Delete a session's rows (events, artifacts, turns, dead letters, its tree if it is a
    root, the session) in the current transaction; the caller commits.

    The session row is locked first (after the tree, per the lock order): a ledger insert of
    its events waits for this transaction and then fails its foreign key (and leaves the
    events out, persister.py), instead of slipping in between the DELETEs and breaking the
    session's own DELETE with a foreign-key error.
    """
    await tree.lock_tree(db, session.root_id)
    await db.exec(select(Session.id).where(col(Session.id) == session.id).with_for_update())
    for table in (Event, Artifact, Turn, DeadLetter):
        await db.exec(delete(table).where(col(table.session_id) == session.id))
    if session.parent_session_id is None:
        await db.exec(delete(SpawnTree).where(col(SpawnTree.root_id) == session.id))
    await db.exec(delete(Session).where(col(Session.id) == session.id))
