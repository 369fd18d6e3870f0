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
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from sqlalchemy import exists, func, insert, literal, update
from sqlalchemy import select as sa_select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel import col, delete, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import Principal, mint_token
from gateway.config import Settings
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
from gateway.errors import (
    Conflict,
    DependencyUnavailable,
    Forbidden,
    GatewayError,
    NotFound,
    TurnTimeout,
)
from gateway.metrics import Metrics
from gateway.schemas import SessionConfig, SessionCreate, SpawnRequest
from gateway.services import family, session_redis, tree
from gateway.services.artifacts import ArtifactStore, safe_relative_path
from gateway.services.events import EventHub
from gateway.services.ledger import Ledger
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
    """Operations on sessions; callers are authorised with :meth:`authorize`.

    Methods that wait (``wait_for_turn``, ``stop``) open short-lived ``db`` handles of their
    own from ``db_factory`` and hold no connection while they wait.
    """

    settings: Settings
    redis: aioredis.Redis
    runtime: ContainerRuntime
    store: ArtifactStore
    hub: EventHub
    jwt_key: str
    db_factory: async_sessionmaker[AsyncSession]
    ledger: Ledger
    metrics: Metrics

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
        started = time.monotonic()
        try:
            await self._provision(db, session, spec, cfg.env, parent)
            self.metrics.container_start_seconds.observe(time.monotonic() - started)
            self.ledger.track(sid)
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
        """Queue a prompt (also while starting or running: turns run in arrival order).

        The turn is inserted only if the session is still live, in one statement under the
        tree's lock, so a concurrent stop either sees it (and cancels it) or refuses it
        (Conflict): no turn is left queued forever.
        """
        turn = Turn(id=str(uuid.uuid4()), session_id=session.id, prompt=prompt)
        await tree.lock_tree(db, session.root_id)
        now = utcnow()
        added = await db.exec(
            insert(Turn).from_select(
                ["id", "session_id", "prompt", "status", "created_at"],
                sa_select(
                    literal(turn.id, _TURN.c.id.type),
                    literal(session.id, _TURN.c.session_id.type),
                    literal(prompt, _TURN.c.prompt.type),
                    literal(TurnStatus.QUEUED, _TURN.c.status.type),
                    literal(now, _TURN.c.created_at.type),
                ).where(
                    exists().where(
                        col(Session.id) == session.id, col(Session.status).in_(tree.LIVE)
                    )
                ),
            )
        )
        if added.rowcount != 1:
            await db.rollback()
            current = await db.get(Session, session.id, populate_existing=True)
            state = current.status.value if current else "deleted"
            raise Conflict(f"session {session.id} is {state}; create a new session to chat")
        await db.exec(
            update(Session).where(col(Session.id) == session.id).values(last_activity=now)
        )
        await db.commit()
        turn.created_at = now
        try:
            await session_redis.push_turn(
                self.redis,
                session.id,
                TurnRequest(message_id=turn.id, prompt=prompt, timeout_seconds=timeout_s),
            )
        except DependencyUnavailable:
            with contextlib.suppress(SQLAlchemyError):
                await db.exec(delete(Turn).where(col(Turn.id) == turn.id))
                await db.commit()
            raise
        return turn

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
        """Ask the wrapper to interrupt the running turn (CLI control-protocol interrupt)."""
        if not session.status.live:
            raise Conflict(f"session {session.id} is {session.status.value}")
        await session_redis.push_control(
            self.redis, session.id, ControlMessage(type=ControlType.INTERRUPT)
        )

    # ------------------------------------------------------------------- stop / delete

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
        if current is None or not current.status.live:
            return current or session
        session = current
        session.last_activity = utcnow()  # the reaper leaves recently active sessions alone
        db.add(session)
        await db.commit()
        if session.container_id:
            await self.runtime.stop(session.container_id, timeout_s=self.settings.stop_timeout_s)
            await self._await_recorded(session.id)
            await self.runtime.remove(session.container_id)
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
            if child.status.live:
                await self.stop(db=db, session=child)

    async def _await_recorded(self, session_id: str) -> None:
        """Wait until the ledger applied the session's ``exited`` and recorded every turn."""
        deadline = time.monotonic() + self.settings.stop_record_timeout_s
        while time.monotonic() < deadline:
            async with self.db_factory() as db:
                current = await db.get(Session, session_id)
                unrecorded = (
                    await db.exec(
                        select(func.count())
                        .select_from(Turn)
                        .where(Turn.session_id == session_id, col(Turn.recorded_at).is_(None))
                    )
                ).one()
            if current is None or (not current.status.live and not unrecorded):
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
        await tree.lock_tree(db, session.root_id)
        for table in (Event, Artifact, Turn, DeadLetter):
            await db.exec(delete(table).where(col(table.session_id) == session.id))
        if session.parent_session_id is None:
            await db.exec(delete(SpawnTree).where(col(SpawnTree.root_id) == session.id))
        row = await db.get(Session, session.id)
        if row is not None:
            await db.delete(row)
        await db.commit()

    # ---------------------------------------------------------------------- artifacts

    async def list_artifacts(self, *, db: AsyncSession, session: Session) -> list[Artifact]:
        """Collected files of the session, by path."""
        rows = await db.exec(
            select(Artifact).where(Artifact.session_id == session.id).order_by(col(Artifact.path))
        )
        return list(rows.all())

    async def open_artifact(
        self, *, db: AsyncSession, session: Session, path: str
    ) -> tuple[Artifact, AsyncIterator[bytes]]:
        """Metadata and a chunk stream of one artifact; InvalidRequest on traversal, NotFound
        if absent (from the database or from storage)."""
        clean = safe_relative_path(path)
        artifact = await db.get(Artifact, (session.id, clean))
        if artifact is None:
            raise NotFound(f"artifact {clean} not found in session {session.id}")
        try:
            chunks = await self.store.open(session.id, clean)
        except FileNotFoundError as exc:
            raise NotFound(f"artifact {clean} is recorded but missing from storage") from exc
        return artifact, chunks


_WAIT_RECHECK_S = 5.0
_TURN: Any = Turn.__table__  # type: ignore[attr-defined]


def _wakes_waiters(raw: bytes) -> bool:
    """Messages a turn waiter needs: gateway notices (no seq) and ``exited`` events."""
    return not raw.startswith(b'{"seq":') or b'"type":"exited"' in raw


def _inherit(parent: Session, given: SessionConfig) -> SessionConfig:
    """A child's config: the parent's, overridden by the fields the request set."""
    base = {k: v for k, v in parent.config.items() if k in SessionConfig.model_fields}
    base.pop("max_budget_usd", None)  # a child runs with the tree's remaining budget
    return SessionConfig.model_validate(base | given.model_dump(exclude_unset=True))


__all__ = ["SessionService", "workspace_volume_name"]
