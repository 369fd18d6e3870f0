"""Sessions: the one place that combines the database, the runtime, Redis and the artifact store.

Creation is all-or-nothing and has one path for roots, ``POST /sessions`` with a parent, and
spawns: the row (with the tree's limits reserved in the same transaction), the Redis spec, token
and ACL user, the volumes and the container are made in that order and, if any step fails,
everything made so far is removed before the error (503 naming the dependency, or 409 naming the
spawn limit) reaches the client.
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

from gateway.auth import Principal, mint_token
from gateway.config import Settings
from gateway.db.models import (
    Artifact,
    Event,
    Session,
    SessionStatus,
    SpawnTree,
    Turn,
    TurnStatus,
    utcnow,
)
from gateway.errors import (
    Conflict,
    DependencyUnavailable,
    Forbidden,
    GatewayError,
    NotFound,
    TurnTimeout,
)
from gateway.schemas import SessionConfig, SessionCreate, SpawnRequest
from gateway.services import family, session_redis, tree
from gateway.services.artifacts import ArtifactStore, safe_relative_path
from gateway.services.events import EventHub
from gateway.services.runtime import ContainerRuntime, ContainerSpec, VolumeMount
from gateway.services.runtime.base import LABEL_OWNER, LABEL_SESSION, LABEL_WORKSPACE
from wrapper.protocol import ControlMessage, ControlType, EventType, SessionSpec, TurnRequest

logger = logging.getLogger(__name__)

CONFIG_MOUNT = "/home/claude/.claude"
WORKSPACE_MOUNT = "/workspace"
# Workspace types whose volume belongs to someone else and survives this session.
_SHARED_WORKSPACES = ("persistent", "inherit")


def workspace_volume_name(owner: str, ws_type: str, ws_id: str | None, sid: str) -> str:
    """Docker volume of a workspace; persistent ones are namespaced by a hash of the owner."""
    if ws_type == "persistent" and ws_id:
        owner_hash = hashlib.sha256(owner.encode()).hexdigest()[:16]
        return f"ccgate-pws-{owner_hash}-{ws_id}"
    return f"ccgate-ws-{sid}"


def config_volume_name(sid: str) -> str:
    """Per-session volume for the CLI's config and transcripts (never shared)."""
    return f"ccgate-cfg-{sid}"


@dataclass(frozen=True)
class _NewSession:
    """What differs between a root, a child made through POST /sessions, and a spawn."""

    owner: str
    parent: Session | None
    workspace_type: str  # ephemeral | persistent | inherit | clone
    workspace_id: str | None
    config: SessionConfig
    prompt: str | None = None
    callback_url: str | None = None


@dataclass
class SessionService:
    """Operations on sessions; callers are authorised with :meth:`authorize`."""

    settings: Settings
    redis: aioredis.Redis
    runtime: ContainerRuntime
    store: ArtifactStore
    hub: EventHub
    jwt_key: str

    # ------------------------------------------------------------------ lookups, authz

    async def get_owned(self, *, db: AsyncSession, owner: str, session_id: str) -> Session:
        """The session if it exists and belongs to ``owner``; raises NotFound otherwise."""
        session = await db.get(Session, session_id)
        if session is None or session.owner != owner:
            raise NotFound(f"session {session_id} not found")
        return session

    async def authorize(
        self, *, db: AsyncSession, principal: Principal, session_id: str, allow_self: bool
    ) -> Session:
        """The session if ``principal`` may touch it, else NotFound (no existence leak).

        A user token reaches every session of its user. A session token reaches the strict
        descendants of its session, and the session itself when ``allow_self`` (spawn,
        children, tree).
        """
        session = await self.get_owned(db=db, owner=principal.user, session_id=session_id)
        scope = principal.session_scope
        if scope is None or (allow_self and session.id == scope):
            return session
        if await family.is_descendant(db, ancestor_id=scope, session=session):
            return session
        raise NotFound(f"session {session_id} not found")

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
        return [c.id for c in await family.children_of(db, session_id)]

    # ------------------------------------------------------------------------- create

    async def create_session(
        self, *, db: AsyncSession, principal: Principal, body: SessionCreate
    ) -> Session:
        """``POST /sessions``: a root, or (with ``parent_session_id``) a child under limits."""
        parent = None
        if body.parent_session_id is not None:
            parent = await self.authorize(
                db=db, principal=principal, session_id=body.parent_session_id, allow_self=True
            )
        elif principal.session_scope is not None:
            raise Forbidden("a session token can only create children of its own session")
        config = body.config
        if parent is not None:
            config = _inherit(parent, body.config)
        return await self._create(
            db,
            _NewSession(
                owner=parent.owner if parent else principal.user,
                parent=parent,
                workspace_type=body.workspace.type.value,
                workspace_id=body.workspace.id,
                config=config,
            ),
        )

    async def spawn(self, *, db: AsyncSession, parent: Session, body: SpawnRequest) -> Session:
        """``POST /sessions/{id}/spawn``: a child that runs ``body.prompt`` exactly once."""
        return await self._create(
            db,
            _NewSession(
                owner=parent.owner,
                parent=parent,
                workspace_type=body.workspace.type.value,
                workspace_id=None,
                config=_inherit(parent, body.config),
                prompt=body.prompt,
                callback_url=str(body.callback) if body.callback else None,
            ),
        )

    def _limits(self) -> tree.SpawnLimits:
        s = self.settings
        return tree.SpawnLimits(
            max_depth=s.max_spawn_depth,
            max_children=s.max_children_per_session,
            max_live=s.max_live_sessions_per_tree,
            max_sessions=s.max_sessions_per_tree,
        )

    async def _create(self, db: AsyncSession, new: _NewSession) -> Session:
        parent = new.parent
        if parent is not None and not parent.status.live:
            raise Conflict(f"parent session {parent.id} is {parent.status.value}")
        sid = str(uuid.uuid4())
        cfg = new.config
        if new.workspace_type == "inherit" and parent is not None:
            volume = parent.workspace_volume
        else:
            volume = workspace_volume_name(new.owner, new.workspace_type, new.workspace_id, sid)
        session = Session(
            id=sid,
            owner=new.owner,
            workspace_type=new.workspace_type,
            workspace_id=new.workspace_id,
            workspace_volume=volume,
            parent_session_id=parent.id if parent else None,
            root_id=parent.root_id if parent else sid,
            depth=parent.depth + 1 if parent else 0,
            callback_url=new.callback_url,
        )
        if parent is not None:
            budget = await tree.admit_child(db, parent=parent, limits=self._limits())
        else:
            budget = cfg.max_budget_usd or self.settings.tree_budget_usd
            db.add(SpawnTree(root_id=sid, owner=new.owner, budget_usd=budget))
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
            max_budget_usd=budget,
            timeout_seconds=cfg.timeout_seconds,
            mcp_servers=cfg.mcp_servers,
            include_partial_messages=cfg.include_partial_messages,
            gateway_url=self.settings.gateway_url_for_containers(),
        )
        session.config = cfg.model_dump(mode="json") | {
            "model": spec.model,
            "permission_mode": spec.permission_mode,
            "max_budget_usd": budget,
        }
        db.add(session)
        await db.commit()
        try:
            await self._provision(db, session, spec, cfg.env, parent)
            if new.prompt is not None:
                await self.chat(db=db, session=session, prompt=new.prompt, timeout_s=None)
        except BaseException:
            await self._undo_create(db, session)
            raise
        if parent is not None:
            await self._notify(
                parent.id,
                EventType.CHILD_SPAWNED,
                {"child_session_id": sid, "depth": session.depth, "prompt": new.prompt},
            )
        return session

    async def _provision(
        self,
        db: AsyncSession,
        session: Session,
        spec: SessionSpec,
        env: dict[str, str],
        parent: Session | None,
    ) -> None:
        sid, owner = session.id, session.owner
        ttl = self.settings.session_token_ttl_s
        token = mint_token(key=self.jwt_key, user=owner, ttl_s=ttl, session_scope=sid)
        username, password = await session_redis.provision(
            self.redis,
            spec,
            acl_secret=self.jwt_key if self.settings.session_redis_acl else None,
            token=token,
            token_ttl_s=ttl,
        )
        await self.runtime.ensure_network(self.settings.docker_network)
        labels = {LABEL_SESSION: sid, LABEL_OWNER: owner}
        if session.workspace_type == "persistent":
            ws_labels = {LABEL_OWNER: owner, LABEL_WORKSPACE: session.workspace_id or ""}
            await self.runtime.create_volume(session.workspace_volume, ws_labels)
        elif session.workspace_type != "inherit":
            await self.runtime.create_volume(session.workspace_volume, labels)
            if session.workspace_type == "clone" and parent is not None:
                await self.runtime.copy_volume(
                    parent.workspace_volume,
                    session.workspace_volume,
                    image=self.settings.image,
                    labels=labels,
                )
        await self.runtime.create_volume(config_volume_name(sid), labels)
        info = await self.runtime.start(
            ContainerSpec(
                name=f"ccgate-{sid}",
                image=self.settings.image,
                env=self._container_env(sid, env, username, password),
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
        """Best-effort removal of everything a failed create made, counters included."""
        with contextlib.suppress(Exception):
            await db.rollback()
        await self._remove_resources(session, quiet=True)
        with contextlib.suppress(Exception):
            await session_redis.purge(self.redis, session.id)
        with contextlib.suppress(Exception):
            await db.exec(delete(Turn).where(col(Turn.session_id) == session.id))
            if session.parent_session_id:
                await tree.release_admission(db, session=session)
            else:
                await db.exec(delete(SpawnTree).where(col(SpawnTree.root_id) == session.id))
            await db.exec(delete(Session).where(col(Session.id) == session.id))
            await db.commit()

    async def _remove_resources(self, session: Session, *, quiet: bool) -> None:
        """Remove the container and the session's own volumes (never a shared workspace)."""
        volumes = [config_volume_name(session.id)]
        if session.workspace_type not in _SHARED_WORKSPACES:
            volumes.append(session.workspace_volume)
        steps = [self.runtime.remove(session.container_id or f"ccgate-{session.id}")]
        steps += [self.runtime.remove_volume(v) for v in volumes]
        for step in steps:
            try:
                await step
            except GatewayError:
                if not quiet:
                    raise

    async def _notify(self, parent_id: str, event: EventType, data: dict[str, Any]) -> None:
        try:
            await session_redis.notify(self.redis, parent_id, event, data)
        except DependencyUnavailable as exc:
            logger.warning("could not notify %s of %s: %s", parent_id, event, exc)

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

    async def latest_turn(self, *, db: AsyncSession, session: Session) -> Turn:
        """The session's most recent prompt; Conflict when it has none."""
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
                    raw = await asyncio.wait_for(sub.get(), min(remaining, poll))
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
        """Stop the session and its whole subtree, children first.

        Each container is stopped for real (SIGTERM, grace, SIGKILL) and removed; volumes stay.
        Prompts that never ran are cancelled. Idempotent on a stopped session.
        """
        for child in await family.children_of(db, session.id):
            await self.stop(db=db, session=child)
        if not session.status.live:
            return session
        session.last_activity = utcnow()  # the reaper leaves recently active sessions alone
        db.add(session)
        await db.commit()
        if session.container_id:
            await self.runtime.stop(session.container_id, timeout_s=self.settings.stop_timeout_s)
            await self.runtime.remove(session.container_id)
        await session_redis.drain_turns(self.redis, session.id)
        await session_redis.revoke_access(self.redis, session.id)
        await tree.lock_tree(db, session.root_id)
        await cancel_open_turns(db, session.id)
        ended = await tree.end_session(db, session, SessionStatus.STOPPED)
        await db.commit()
        if ended and session.parent_session_id:
            await self._notify(
                session.parent_session_id, EventType.CHILD_STOPPED, {"child_session_id": session.id}
            )
        return session

    async def delete(self, *, db: AsyncSession, session: Session) -> None:
        """Delete the session and its subtree: containers, own volumes, Redis keys, artifacts,
        events, turns and rows. A deleted child is detached from its parent."""
        for child in await family.children_of(db, session.id):
            await self.delete(db=db, session=child)
        await self.stop(db=db, session=session)
        await self._remove_resources(session, quiet=False)
        await session_redis.purge(self.redis, session.id)
        await self.store.delete_session(session.id)
        await tree.lock_tree(db, session.root_id)
        for table in (Event, Artifact, Turn):
            await db.exec(delete(table).where(col(table.session_id) == session.id))
        if session.parent_session_id is None:
            await db.exec(delete(SpawnTree).where(col(SpawnTree.root_id) == session.id))
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


def _inherit(parent: Session, given: SessionConfig) -> SessionConfig:
    """A child's config: the parent's, overridden by the fields the request set."""
    base = {k: v for k, v in parent.config.items() if k in SessionConfig.model_fields}
    base.pop("max_budget_usd", None)  # a child runs with the tree's remaining budget
    return SessionConfig.model_validate(base | given.model_dump(exclude_unset=True))


async def cancel_open_turns(db: AsyncSession, session_id: str) -> None:
    """Mark prompts that will never run (queued, or cut off mid-turn) as cancelled."""
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


__all__ = ["SessionService", "cancel_open_turns", "workspace_volume_name"]
