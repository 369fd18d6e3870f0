"""The reaper: reconciles Docker with the database so nothing is orphaned or left "running".

At start-up and then every ``interval_s``, the replica holding the ``reaper:<deployment>``
lease (lease.py; a replica that dies loses it within its TTL):
- removes ccgate containers whose session no longer exists or is stopped/failed,
- removes per-session volumes whose session no longer exists (persistent workspaces are kept),
- removes containers of an open session other than its current one (a resumed session's
  earlier containers), once their files are collected,
- closes the stream of a live session whose container is gone or has exited without the
  wrapper's ``exited`` event and without the event stream reporting it (the gateway was down):
  the same events as container_deaths.py, so the ledger pauses the session; after a grace
  period, so a stop in progress or a just-created container is never mistaken for a crash,
- repairs a live session that never got its container (its create or resume died with its
  gateway) once ``creation_timeout_s`` has passed: a resume goes back to paused, a create
  fails,
- leaves the container of an ended session in place while one of its turns still waits for
  its files to be collected (the collector removes it afterwards),
- renews each live session's token (the ccgate MCP tools' credential) before it expires, and
  re-creates its Redis ACL user if Redis restarted without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from datetime import timedelta

import redis.asyncio as aioredis
from redis.exceptions import RedisError
from sqlalchemy import or_, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import mint_token
from gateway.db.errors import is_outage
from gateway.db.models import PoolSlot, Session, SessionStatus, Turn, TurnStatus, as_utc, utcnow
from gateway.errors import DependencyUnavailable
from gateway.services import session_redis
from gateway.services.container_deaths import DeathWatch
from gateway.services.lease import Lease
from gateway.services.net_sandboxes import NetworkSandboxes
from gateway.services.runtime import ContainerInfo, ContainerRuntime, ContainerState
from gateway.services.runtime.base import LABEL_HELPER, LABEL_SESSION
from gateway.services.tree import LIVE, OPEN, cancel_open_turns, end_session, lock_tree

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
        deaths: DeathWatch,
        creation_timeout_s: float = 600.0,
        lease: Lease | None = None,
    ) -> None:
        self._runtime = runtime
        self._lease = lease
        self._deaths = deaths
        self._redis = redis
        self._jwt_key = jwt_key
        self._token_ttl_s = token_ttl_s
        self._session_acl = session_acl
        self._db = db_factory
        self._interval_s = interval_s
        self._grace = timedelta(seconds=grace_s)
        self._creation_timeout = timedelta(seconds=creation_timeout_s)
        self.sandboxes: NetworkSandboxes | None = None
        """Swept with the rest when set (leaked network sandboxes)."""

    async def run(self) -> None:
        """Sweep at once (reconciliation at start-up: what a crashed gateway left behind),
        then every ``interval_s`` forever (run it under the Supervisor), on the replica that
        holds the lease when one is given. An unavailable dependency skips a sweep; any other
        failure propagates to the supervisor."""
        try:
            await self._loop()
        finally:
            if self._lease is not None:
                with contextlib.suppress(Exception):
                    await self._lease.release()  # the next replica takes over at once

    async def _loop(self) -> None:
        first = True
        while True:
            if not first:
                await asyncio.sleep(self._interval_s)
            first = False
            try:
                if self._lease is None or await self._lease.acquire():
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
            "streams_closed": 0,
            "sessions_repaired": 0,
            "volumes_removed": 0,
            "tokens_renewed": 0,
        }
        containers = [c for c in await self._runtime.list_managed() if LABEL_HELPER not in c.labels]
        by_session: dict[str, list[ContainerInfo]] = defaultdict(list)
        for container in containers:
            by_session[container.labels.get(LABEL_SESSION, "")].append(container)
        # Listed before the query: a session's row is committed before its volumes exist, so
        # every volume seen here has its row visible below.
        volumes = await self._runtime.list_managed_volumes()
        mentioned = set(by_session) | {v.get(LABEL_SESSION, "") for v in volumes.values()}
        async with self._db() as db:
            # Warm-pool slots are the pool manager's. Read before the sessions: a claim turns a
            # slot into a session in one commit, so each id is seen as one or the other.
            slots = set(
                (await db.exec(select(PoolSlot.id).where(col(PoolSlot.id).in_(mentioned)))).all()
            )
            # Open sessions and those the engine mentions, not the whole history; by id, so
            # two replicas' reapers take tree locks in the same order.
            rows = (
                await db.exec(
                    select(Session)
                    .where(or_(col(Session.status).in_(OPEN), col(Session.id).in_(mentioned)))
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
        for sid, found in by_session.items():
            if sid in slots and sid not in sessions:
                continue
            session = sessions.get(sid)
            if session is not None and sid in collecting:
                continue  # the collector still copies files out of it (then removes it)
            for container in found:
                if self._orphan(session, container):
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
            if session.container_id is None:
                if await self._repair_containerless(session):
                    done["sessions_repaired"] += 1
                continue
            alive = [
                c
                for c in by_session.get(session.id, [])
                if c.id == session.container_id and c.state is not ContainerState.EXITED
            ]
            if alive:
                continue
            exited = [c for c in by_session.get(session.id, []) if c.id == session.container_id]
            # A death the event stream did not report (the gateway was down): close the
            # stream the same way (the ledger then pauses the session).
            if await self._deaths.close(
                session.id,
                session.container_id,
                exit_code=exited[0].exit_code if exited else None,
                gone=not exited,
            ):
                done["streams_closed"] += 1
        live = [s for s in rows if s.status.live]
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
            owner = labels.get(LABEL_SESSION)
            if per_session and owner not in sessions and owner not in slots:
                await self._runtime.remove_volume(name)
                done["volumes_removed"] += 1
        if self.sandboxes is not None:
            done["sandboxes_removed"] = await self.sandboxes.sweep()
        return done

    def _orphan(self, session: Session | None, container: ContainerInfo) -> bool:
        """True for a container no open session runs on: its session is gone or ended; or it
        is an earlier container of an open session (dead, or alive beside the current one);
        or it runs for a session that never recorded it (a create or resume that died with
        its gateway) past the creation timeout. A container being started right now — not
        yet recorded on its session — is never one."""
        if session is None or not session.status.open:
            return True
        if session.container_id == container.id:
            return False
        if container.state is ContainerState.EXITED or session.container_id is not None:
            return True
        began = as_utc(session.resumed_at) or as_utc(session.created_at) or utcnow()
        return began < utcnow() - self._creation_timeout

    async def _repair_containerless(self, session: Session) -> bool:
        """A live session with no container past the creation timeout: its create or resume
        died with its gateway. A resume goes back to paused (the next prompt retries); a
        create fails. True when it changed something."""
        created = as_utc(session.resumed_at) or as_utc(session.created_at) or utcnow()
        if created > utcnow() - self._creation_timeout:
            return False  # still being created (e.g. a slow workspace clone)
        async with self._db() as db:
            await lock_tree(db, session.root_id)
            if session.resumed_at is not None:
                changed = (
                    await db.exec(
                        update(Session)
                        .where(col(Session.id) == session.id)
                        .where(col(Session.status).in_(LIVE))
                        .where(col(Session.container_id).is_(None))
                        .values(status=SessionStatus.PAUSED, resumed_at=None)
                    )
                ).rowcount == 1
            else:
                current = await db.get(Session, session.id)
                changed = current is not None and await end_session(
                    db, current, SessionStatus.FAILED, "the session was never started"
                )
                await cancel_open_turns(db, session.id, running=TurnStatus.FAILED, reason="exited")
            await db.commit()
        logger.warning("reaper: session %s had no container; repaired", session.id)
        return changed
