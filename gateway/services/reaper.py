"""The reaper: reconciles Docker with the database so nothing is orphaned or left "running".

Every ``interval_s`` each gateway process:
- removes ccgate containers whose session no longer exists or is stopped/failed,
- removes per-session volumes whose session no longer exists (persistent workspaces are kept),
- marks a live session failed when its container is gone or has exited without the wrapper's
  ``exited`` event (OOM kill, engine restart), after a grace period so a stop in progress or a
  just-created container is never mistaken for a crash; a session still being created (no
  container id yet: a slow workspace clone) is left alone until ``creation_timeout_s``,
- leaves the container of an ended session in place while one of its turns still waits for
  its files to be collected (the collector removes it afterwards),
- renews each live session's token (the ccgate MCP tools' credential) before it expires, and
  re-creates its Redis ACL user if Redis restarted without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from datetime import timedelta

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import or_
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import mint_token
from gateway.db.errors import is_outage
from gateway.db.models import Session, SessionStatus, Turn, TurnStatus, as_utc, utcnow
from gateway.errors import DependencyUnavailable, GatewayError
from gateway.services import session_redis
from gateway.services.envelopes import notice_key
from gateway.services.runtime import ContainerRuntime, ContainerState
from gateway.services.runtime.base import LABEL_HELPER, LABEL_SESSION
from gateway.services.tree import LIVE, end_session, lock_tree
from wrapper.protocol import EventType

logger = logging.getLogger(__name__)


class Reaper:
    """Periodic reconciliation of containers, volumes and session status."""

    def __init__(
        self,
        *,
        runtime: ContainerRuntime,
        db_factory: async_sessionmaker[AsyncSession],
        redis: aioredis.Redis,
        jwt_key: str,
        token_ttl_s: int,
        session_acl: bool,
        interval_s: float,
        grace_s: float,
        creation_timeout_s: float = 600.0,
    ) -> None:
        self._runtime = runtime
        self._redis = redis
        self._jwt_key = jwt_key
        self._token_ttl_s = token_ttl_s
        self._session_acl = session_acl
        self._db = db_factory
        self._interval_s = interval_s
        self._grace = timedelta(seconds=grace_s)
        self._creation_timeout = timedelta(seconds=creation_timeout_s)

    async def run(self) -> None:
        """Sweep every ``interval_s`` forever (run it under the Supervisor). An unavailable
        dependency skips a sweep; any other failure propagates to the supervisor."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.sweep()
            except (DependencyUnavailable, RedisError, OSError) as exc:
                logger.warning("reaper: sweep skipped: %s", exc)
            except SQLAlchemyError as exc:
                if not is_outage(exc):
                    raise
                logger.warning("reaper: sweep skipped, database unavailable: %s", exc)

    async def sweep(self) -> dict[str, int]:
        """One reconciliation pass; returns counts of what it did."""
        done = {
            "containers_removed": 0,
            "sessions_failed": 0,
            "volumes_removed": 0,
            "tokens_renewed": 0,
        }
        failed: list[Session] = []
        containers = [c for c in await self._runtime.list_managed() if LABEL_HELPER not in c.labels]
        by_session = {c.labels.get(LABEL_SESSION, ""): c for c in containers}
        # Listed before the query: a session's row is committed before its volumes exist, so
        # every volume seen here has its row visible below.
        volumes = await self._runtime.list_managed_volumes()
        mentioned = set(by_session) | {v.get(LABEL_SESSION, "") for v in volumes.values()}
        async with self._db() as db:
            # Live sessions and those the engine mentions, not the whole history; by id, so two
            # replicas' reapers take tree locks in the same order.
            rows = (
                await db.exec(
                    select(Session)
                    .where(or_(col(Session.status).in_(LIVE), col(Session.id).in_(mentioned)))
                    .order_by(col(Session.id))
                )
            ).all()
            sessions = {s.id: s for s in rows}
            collecting = set(
                (
                    await db.exec(
                        select(Turn.session_id).where(
                            col(Turn.session_id).in_(list(by_session)),
                            col(Turn.pending_files).is_not(None),
                        )
                    )
                ).all()
            )
            for sid, container in by_session.items():
                session = sessions.get(sid)
                if session is not None and sid in collecting:
                    continue  # the collector still copies files out of it
                if session is None or not session.status.live:
                    logger.info("reaper: removing orphan container %s", container.name)
                    await self._runtime.remove(container.id)
                    done["containers_removed"] += 1
            cutoff = utcnow() - self._grace
            for session in rows:
                if not session.status.live:
                    continue
                last = as_utc(session.last_activity) or utcnow()
                if last > cutoff:
                    continue
                created = as_utc(session.created_at) or utcnow()
                if session.container_id is None and created > utcnow() - self._creation_timeout:
                    continue  # still being created (e.g. a slow workspace clone)
                found = by_session.get(session.id)
                if found is not None and found.state is not ContainerState.EXITED:
                    continue
                reason = (
                    "the session container is gone"
                    if found is None
                    else f"the session container exited with status {found.exit_code}"
                )
                await lock_tree(db, session.root_id)
                ended = await end_session(db, session, SessionStatus.FAILED, reason)
                await self._fail_turns(db, session, reason)
                if ended:
                    failed.append(session)
                    done["sessions_failed"] += 1
                if found is not None:
                    await self._runtime.remove(found.id)
            await db.commit()
            live = [s for s in rows if s.status.live]
        for session in failed:
            if session.parent_session_id:
                with contextlib.suppress(GatewayError):
                    await session_redis.notify(
                        self._redis,
                        session.parent_session_id,
                        EventType.CHILD_FAILED,
                        {
                            "child_session_id": session.id,
                            "status": "failed",
                            "error": session.error,
                        },
                        key=notice_key(self._jwt_key),
                    )
        for session in live:
            if self._session_acl and await session_redis.ensure_acl_user(
                self._redis, session.id, session_redis.acl_password(self._jwt_key, session.id)
            ):
                logger.warning("reaper: re-created the Redis ACL user of %s", session.id)
                done["acl_users_restored"] = done.get("acl_users_restored", 0) + 1
            if await session_redis.token_ttl(self._redis, session.id) < self._token_ttl_s / 2:
                token = mint_token(
                    key=self._jwt_key,
                    user=session.owner,
                    ttl_s=self._token_ttl_s,
                    session_scope=session.id,
                )
                await session_redis.store_token(self._redis, session.id, token, self._token_ttl_s)
                done["tokens_renewed"] += 1
        for name, labels in volumes.items():
            per_session = name.startswith(("ccgate-ws-", "ccgate-cfg-"))
            if per_session and labels.get(LABEL_SESSION) not in sessions:
                await self._runtime.remove_volume(name)
                done["volumes_removed"] += 1
        return done

    async def _fail_turns(self, db: AsyncSession, session: Session, reason: str) -> None:
        logger.warning("reaper: session %s failed: %s", session.id, reason)
        rows = await db.exec(
            select(Turn).where(
                Turn.session_id == session.id,
                col(Turn.status).in_([TurnStatus.QUEUED, TurnStatus.RUNNING]),
            )
        )
        for turn in rows.all():
            turn.status = TurnStatus.FAILED
            turn.errors = [reason]
            turn.completed_at = utcnow()
            turn.recorded_at = utcnow()
            db.add(turn)
