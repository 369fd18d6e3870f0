"""Sessions: the one place that combines the database, the runtime, Redis and the artifact store.

Creation is all-or-nothing: the row, the Redis spec and ACL user, the volumes and the container
are made in that order and, if any step fails, everything made so far is removed before the error
(503 naming the dependency) reaches the client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy import func
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.models import (
    Artifact,
    Event,
    Session,
    SessionStatus,
    Turn,
    TurnStatus,
    utcnow,
)
from gateway.errors import Conflict, DependencyUnavailable, GatewayError, NotFound, TurnTimeout
from gateway.schemas import SessionCreate, WorkspaceType
from gateway.services import session_redis
from gateway.services.artifacts import ArtifactStore, safe_relative_path
from gateway.services.events import EventHub
from gateway.services.runtime import ContainerRuntime, ContainerSpec, VolumeMount
from gateway.services.runtime.base import LABEL_OWNER, LABEL_SESSION, LABEL_WORKSPACE
from wrapper.protocol import ControlMessage, ControlType, SessionSpec, TurnRequest

logger = logging.getLogger(__name__)

CONFIG_MOUNT = "/home/claude/.claude"
WORKSPACE_MOUNT = "/workspace"


def workspace_volume_name(
    owner: str, workspace_type: WorkspaceType, ws_id: str | None, sid: str
) -> str:
    """Docker volume of a workspace; persistent ones are namespaced by a hash of the owner."""
    if workspace_type is WorkspaceType.PERSISTENT and ws_id:
        owner_hash = hashlib.sha256(owner.encode()).hexdigest()[:16]
        return f"ccgate-pws-{owner_hash}-{ws_id}"
    return f"ccgate-ws-{sid}"


def config_volume_name(sid: str) -> str:
    """Per-session volume for the CLI's config and transcripts (never shared)."""
    return f"ccgate-cfg-{sid}"


@dataclass
class SessionService:
    """Operations on sessions; every method scopes to ``owner`` (foreign sessions are 404)."""

    settings: Settings
    redis: aioredis.Redis
    runtime: ContainerRuntime
    store: ArtifactStore
    hub: EventHub

    # ------------------------------------------------------------------------- lookups

    async def get_owned(self, *, db: AsyncSession, owner: str, session_id: str) -> Session:
        """The session if it exists and belongs to ``owner``; raises NotFound otherwise."""
        session = await db.get(Session, session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"session {session_id} not found")
        return session

    async def list_sessions(
        self,
        *,
        db: AsyncSession,
        owner: str,
        status: SessionStatus | None,
        limit: int,
        offset: int,
    ) -> tuple[list[Session], int]:
        """A page of the owner's sessions, newest first, and the total count."""
        query = select(Session).where(Session.owner == owner)
        counter = select(func.count()).select_from(Session).where(Session.owner == owner)
        if status is not None:
            query = query.where(Session.status == status)
            counter = counter.where(Session.status == status)
        total = (await db.exec(counter)).one()
        rows = await db.exec(
            query.order_by(col(Session.created_at).desc()).offset(offset).limit(limit)
        )
        return list(rows.all()), int(total)

    async def child_ids(self, *, db: AsyncSession, session_id: str) -> list[str]:
        """Ids of the sessions whose parent is ``session_id``."""
        rows = await db.exec(
            select(Session.id)
            .where(Session.parent_session_id == session_id)
            .order_by(col(Session.created_at))
        )
        return list(rows.all())

    # ------------------------------------------------------------------------- create

    async def create_session(self, *, db: AsyncSession, owner: str, body: SessionCreate) -> Session:
        """Create the row, Redis keys, volumes and container; all or nothing."""
        if body.parent_session_id is not None:
            parent = await self.get_owned(db=db, owner=owner, session_id=body.parent_session_id)
            if not parent.status.live:
                raise Conflict(f"parent session {parent.id} is {parent.status.value}")
        sid = str(uuid.uuid4())
        cfg = body.config
        spec = SessionSpec(
            session_id=sid,
            model=cfg.model or self.settings.default_model,
            system_prompt=cfg.system_prompt,
            append_system_prompt=cfg.append_system_prompt,
            allowed_tools=cfg.allowed_tools,
            disallowed_tools=cfg.disallowed_tools,
            permission_mode=(
                cfg.permission_mode.value
                if cfg.permission_mode
                else self.settings.default_permission_mode
            ),
            max_turns=cfg.max_turns,
            timeout_seconds=cfg.timeout_seconds,
            mcp_servers=cfg.mcp_servers,
            include_partial_messages=cfg.include_partial_messages,
        )
        session = Session(
            id=sid,
            owner=owner,
            workspace_type=body.workspace.type.value,
            workspace_id=body.workspace.id,
            workspace_volume=workspace_volume_name(
                owner, body.workspace.type, body.workspace.id, sid
            ),
            config=cfg.model_dump(mode="json")
            | {"model": spec.model, "permission_mode": spec.permission_mode},
            parent_session_id=body.parent_session_id,
        )
        db.add(session)
        await db.commit()
        try:
            username, password = await session_redis.provision(
                self.redis, spec, acl=self.settings.session_redis_acl
            )
            await self.runtime.ensure_network(self.settings.docker_network)
            labels = {LABEL_SESSION: sid, LABEL_OWNER: owner}
            workspace_labels = (
                {LABEL_OWNER: owner, LABEL_WORKSPACE: body.workspace.id or ""}
                if body.workspace.type is WorkspaceType.PERSISTENT
                else labels
            )
            await self.runtime.create_volume(session.workspace_volume, workspace_labels)
            await self.runtime.create_volume(config_volume_name(sid), labels)
            info = await self.runtime.start(
                ContainerSpec(
                    name=f"ccgate-{sid}",
                    image=self.settings.image,
                    env=self._container_env(sid, cfg.env, username, password),
                    labels=labels,
                    mounts=[
                        VolumeMount(session.workspace_volume, WORKSPACE_MOUNT),
                        VolumeMount(config_volume_name(sid), CONFIG_MOUNT),
                    ],
                    network=self.settings.docker_network,
                    memory=self.settings.container_memory,
                    cpus=self.settings.container_cpus,
                    pids=self.settings.container_pids,
                    extra_hosts=self.settings.container_extra_hosts,
                )
            )
            session.container_id = info.id
            db.add(session)
            await db.commit()
        except BaseException:
            await self._undo_create(db, session)
            raise
        return session

    def _container_env(
        self, sid: str, user_env: dict[str, str], username: str | None, password: str | None
    ) -> dict[str, str]:
        env = dict(user_env)
        s = self.settings
        if s.anthropic_base_url:
            env["ANTHROPIC_BASE_URL"] = s.anthropic_base_url
        if s.anthropic_api_key:
            env["ANTHROPIC_API_KEY"] = s.anthropic_api_key.get_secret_value()
        if s.anthropic_auth_token:
            env["ANTHROPIC_AUTH_TOKEN"] = s.anthropic_auth_token.get_secret_value()
        env.update(
            CCGATE_SESSION_ID=sid,
            CCGATE_REDIS_URL=s.container_redis_url(username, password),
            CCGATE_STREAM_MAXLEN=str(s.stream_maxlen),
            # The wrapper's stop (interrupt 2 s + EOF wait + SIGTERM wait) fits in docker stop's.
            CCGATE_STOP_GRACE_S=f"{max(0.5, (s.stop_timeout_s - 4) / 2):g}",
            CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC="1",
        )
        return env

    async def _undo_create(self, db: AsyncSession, session: Session) -> None:
        """Best-effort removal of everything a failed create made."""
        with contextlib.suppress(Exception):
            await db.rollback()
        await self._remove_resources(session, remove_workspace=True, quiet=True)
        with contextlib.suppress(Exception):
            await session_redis.purge(self.redis, session.id)
        with contextlib.suppress(Exception):
            await db.exec(delete(Session).where(col(Session.id) == session.id))
            await db.commit()

    async def _remove_resources(
        self, session: Session, *, remove_workspace: bool, quiet: bool
    ) -> None:
        """Remove the container by name and the session's volumes."""
        steps: list[Any] = [self.runtime.remove(session.container_id or f"ccgate-{session.id}")]
        for step in steps:
            try:
                await step
            except GatewayError:
                if not quiet:
                    raise
        volumes = [config_volume_name(session.id)]
        if remove_workspace and session.workspace_type != WorkspaceType.PERSISTENT.value:
            volumes.append(session.workspace_volume)
        for volume in volumes:
            try:
                await self.runtime.remove_volume(volume)
            except GatewayError:
                if not quiet:
                    raise

    # --------------------------------------------------------------------------- chat

    async def chat(
        self, *, db: AsyncSession, session: Session, prompt: str, timeout_s: float | None
    ) -> Turn:
        """Queue a prompt (also while starting or running: turns run in arrival order)."""
        if not session.status.live:
            raise Conflict(
                f"session {session.id} is {session.status.value}; create a new session to chat"
            )
        turn = Turn(id=str(uuid.uuid4()), session_id=session.id, prompt=prompt)
        db.add(turn)
        session.last_activity = utcnow()
        db.add(session)
        await db.commit()
        try:
            await session_redis.push_turn(
                self.redis,
                session.id,
                TurnRequest(message_id=turn.id, prompt=prompt, timeout_seconds=timeout_s),
            )
        except DependencyUnavailable:
            with contextlib.suppress(SQLAlchemyError):
                await db.delete(turn)
                await db.commit()
            raise
        return turn

    async def wait_for_turn(self, *, db_factory: Any, turn: Turn, timeout_s: float) -> Turn:
        """Wait until the ledger finalised the turn (result and artifacts recorded).

        Wakes on the session's turn_completed events and re-reads the row; raises TurnTimeout.
        """
        sub = await self.hub.subscribe(turn.session_id)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        poll = 0.5
        try:
            while True:
                async with db_factory() as db:
                    current = await db.get(Turn, turn.id)
                if current is None:
                    raise NotFound(f"message {turn.id} not found")
                if current.status.final:
                    done: Turn = current
                    return done
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise TurnTimeout(
                        f"turn {turn.id} is still {current.status.value} after {timeout_s:g}s; "
                        f"poll GET /api/v1/sessions/{turn.session_id}/messages/{turn.id}"
                    )
                try:
                    raw = await asyncio.wait_for(sub.queue.get(), min(remaining, poll))
                    if b'"type":"turn_completed"' in raw or b'"type":"exited"' in raw:
                        poll = 0.02
                except TimeoutError:
                    pass
        finally:
            await self.hub.unsubscribe(sub)

    async def get_message(self, *, db: AsyncSession, session: Session, message_id: str) -> Turn:
        """A turn of this session; NotFound otherwise."""
        turn = await db.get(Turn, message_id)
        if turn is None or turn.session_id != session.id:
            raise NotFound(f"message {message_id} not found in session {session.id}")
        return turn

    async def interrupt(self, *, session: Session) -> None:
        """Ask the wrapper to interrupt the running turn (CLI control-protocol interrupt)."""
        if not session.status.live:
            raise Conflict(f"session {session.id} is {session.status.value}")
        await session_redis.push_control(
            self.redis, session.id, ControlMessage(type=ControlType.INTERRUPT)
        )

    # ------------------------------------------------------------------- stop / delete

    async def stop(self, *, db: AsyncSession, session: Session) -> Session:
        """Stop the container for real (SIGTERM, grace, SIGKILL), remove it, keep the volumes.

        Prompts that never ran are marked cancelled. Idempotent on a stopped session.
        """
        if session.status in (SessionStatus.STOPPED, SessionStatus.FAILED):
            return session
        session.last_activity = utcnow()  # the reaper leaves recently active sessions alone
        db.add(session)
        await db.commit()
        if session.container_id:
            await self.runtime.stop(session.container_id, timeout_s=self.settings.stop_timeout_s)
            await self.runtime.remove(session.container_id)
        await session_redis.drain_turns(self.redis, session.id)
        await session_redis.revoke_access(self.redis, session.id)
        await db.refresh(session)
        session.status = SessionStatus.STOPPED
        session.last_activity = utcnow()
        db.add(session)
        await self._cancel_open_turns(db, session.id)
        await db.commit()
        return session

    async def _cancel_open_turns(self, db: AsyncSession, session_id: str) -> None:
        rows = await db.exec(
            select(Turn).where(
                Turn.session_id == session_id,
                col(Turn.status).in_([TurnStatus.QUEUED, TurnStatus.RUNNING]),
            )
        )
        for turn in rows.all():
            turn.status = TurnStatus.CANCELLED
            turn.completed_at = utcnow()
            db.add(turn)

    async def delete(self, *, db: AsyncSession, session: Session) -> None:
        """Stop, then remove container, volumes, Redis keys, artifacts and rows. Children are
        detached (their parent id is cleared)."""
        await self.stop(db=db, session=session)
        await self._remove_resources(session, remove_workspace=True, quiet=False)
        await session_redis.purge(self.redis, session.id)
        await self.store.delete_session(session.id)
        for table in (Event, Artifact, Turn):
            await db.exec(delete(table).where(col(table.session_id) == session.id))
        children = await db.exec(select(Session).where(Session.parent_session_id == session.id))
        for child in children.all():
            child.parent_session_id = None
            db.add(child)
        await db.delete(session)
        await db.commit()

    # ---------------------------------------------------------------------- artifacts

    async def list_artifacts(self, *, db: AsyncSession, session: Session) -> list[Artifact]:
        """Collected files of the session, by path."""
        rows = await db.exec(
            select(Artifact).where(Artifact.session_id == session.id).order_by(col(Artifact.path))
        )
        return list(rows.all())

    async def read_artifact(
        self, *, db: AsyncSession, session: Session, path: str
    ) -> tuple[Artifact, bytes]:
        """Metadata and bytes of one artifact; InvalidRequest on traversal, NotFound if absent."""
        clean = safe_relative_path(path)
        artifact = await db.get(Artifact, (session.id, clean))
        if artifact is None:
            raise NotFound(f"artifact {clean} not found in session {session.id}")
        try:
            data = await self.store.get(session.id, clean)
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {clean} is recorded but missing from storage") from exc
        return artifact, data
