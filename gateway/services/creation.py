"""Creation: one all-or-nothing path for roots, ``POST /sessions`` with a parent, and spawns.

The row (with the tree's limits reserved in the same transaction), the Redis spec, token
and ACL user, the volumes and the container are made in that order and, if any step fails,
everything made so far is removed before the error (503 naming the dependency, or 409 naming the
spawn limit) reaches the client."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import func, update
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import Principal
from gateway.db.models import (
    PoolSlot,
    Session,
    SessionStatus,
    SpawnTree,
    WorkspaceType,
    utcnow,
)
from gateway.errors import (
    AdmissionRefused,
    Conflict,
    Forbidden,
)
from gateway.schemas import SessionConfig, SessionCreate, SpawnRequest
from gateway.services import admission, tree
from gateway.services.callbacks import resolve_callback
from gateway.services.mcp_profiles import PROFILE_SERVERS_KEY, McpProfiles, attach
from gateway.services.metering.credentials import new_proxy_key
from gateway.services.pool_claim import PoolClaims
from gateway.services.provision import session_spec, workspace_volume_name
from gateway.services.session_base import logger
from gateway.services.turns import TurnOps
from wrapper.protocol import EventType


@dataclass(frozen=True)
class _NewSession:
    """What differs between a root, a child made through POST /sessions, and a spawn."""

    owner: str
    parent: Session | None
    workspace_type: WorkspaceType
    workspace_id: str | None
    config: SessionConfig
    prompt: str | None = None
    callback_url: str | None = None


class Creation(PoolClaims, TurnOps):
    """Roots, children through POST /sessions, and spawns: one path, all-or-nothing."""

    async def create_session(
        self, *, db: AsyncSession, principal: Principal, body: SessionCreate, queue: bool = False
    ) -> Session:
        """``POST /sessions``: a root, or (with ``parent_session_id``) a child under limits.

        Over an admission limit (admission.py): AdmissionRefused (429) — or, with ``queue``,
        the session is created ``queued`` and started by the lifecycle loop when room frees."""
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
                workspace_type=body.workspace.type,
                workspace_id=body.workspace.id,
                config=config,
            ),
            queue=queue,
        )

    async def spawn(self, *, db: AsyncSession, parent: Session, body: SpawnRequest) -> Session:
        """``POST /sessions/{id}/spawn``: a child that runs ``body.prompt`` exactly once.

        A ``callback`` that is or resolves to a loopback, private or link-local address is
        refused (CallbackRefused, 422) before anything is created."""
        if body.callback is not None:
            await resolve_callback(str(body.callback), self.settings.callback_networks)
        return await self._create(
            db,
            _NewSession(
                owner=parent.owner,
                parent=parent,
                workspace_type=body.workspace.type,
                workspace_id=None,
                config=_inherit(parent, body.config),
                prompt=body.prompt,
                callback_url=str(body.callback) if body.callback else None,
            ),
        )

    async def create_job_session(
        self, *, db: AsyncSession, owner: str, job_id: str, config: SessionConfig, prompt: str
    ) -> Session:
        """A root session for a job (job_queue.py): its /workspace is the job's volume, made
        beforehand (job_workspace.py), and it runs ``prompt`` once. Raises AdmissionRefused
        (no room now) and whatever a create raises."""
        return await self._create(
            db,
            _NewSession(
                owner=owner,
                parent=None,
                workspace_type=WorkspaceType.JOB,
                workspace_id=job_id,
                config=config,
                prompt=prompt,
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

    async def _create(self, db: AsyncSession, new: _NewSession, *, queue: bool = False) -> Session:
        async with self.admission_guard:
            session, proxy_key = await self._insert(db, new, queue=queue)
        if session.status is SessionStatus.QUEUED:
            logger.info("session %s queued for admission", session.id)
            self.wake_lifecycle(session.id)
            return session
        parent = new.parent
        spec = session_spec(self.settings, session)
        started = time.monotonic()
        try:
            if proxy_key is None:  # a warm-pool container was claimed
                self.wake_pool()
                if not await self._bind_claimed(session, spec):
                    proxy_key = await self._unclaim(db, session)
            if proxy_key is not None:
                login = await self._prepare(session, spec, parent)
                await self._start_container(
                    db, session, spec, proxy_key, name=f"ccgate-{session.id}", login=login
                )
            self.metrics.container_start_seconds.observe(time.monotonic() - started)
            self.ledger.track(session.id)
            if new.prompt is not None:
                await self.chat(db=db, session=session, prompt=new.prompt, timeout_s=None)
        except BaseException:
            await self._undo_create(db, session)
            raise
        if parent is not None:
            await self._notify(
                parent.id,
                EventType.CHILD_SPAWNED,
                {"child_session_id": session.id, "depth": session.depth, "prompt": new.prompt},
            )
        return session

    async def _insert(
        self, db: AsyncSession, new: _NewSession, *, queue: bool
    ) -> tuple[Session, str | None]:
        """Insert the row (with the tree's admission) after the admission check: ``starting``,
        or ``queued`` when over a limit and ``queue``. Returns it and its model credential —
        None when it claimed a warm-pool container (warm_pool.py: the session takes the
        slot's id, container and credential, in this same transaction)."""
        parent = new.parent
        if parent is not None and not parent.status.live:
            raise Conflict(f"parent session {parent.id} is {parent.status.value}")
        sealed_profiles = await self._profile_servers(db, new)
        await admission.lock(db)
        status = SessionStatus.STARTING
        ahead = 0
        slot: PoolSlot | None = None
        limits = self.settings.admission_limits()
        cfg = new.config
        session_budget = cfg.session_budget_usd or self.settings.session_budget_usd
        tree_budget = (
            None if parent is not None else cfg.max_budget_usd or self.settings.tree_budget_usd
        )
        stored = cfg.model_dump(mode="json") | {
            "model": cfg.model or self.settings.default_model,
            "permission_mode": (
                cfg.permission_mode.value
                if cfg.permission_mode
                else self.settings.default_permission_mode
            ),
            "max_budget_usd": tree_budget,
            "session_budget_usd": session_budget,
        }
        if sealed_profiles is not None:
            stored[PROFILE_SERVERS_KEY] = sealed_profiles
        try:
            await admission.check_capacity(db, new.owner, limits, memory=False)
            if self.pool_profiles:
                slot = await self._claim_slot(db, new.workspace_type, stored)
            if slot is None:
                admission.check_memory(limits)
        except AdmissionRefused:
            if not queue or new.prompt is not None:
                await db.rollback()
                raise
            status = SessionStatus.QUEUED
            ahead = (
                await db.exec(
                    select(func.count())
                    .select_from(Session)
                    .where(col(Session.queue_position).is_not(None))
                )
            ).one()
        sid = slot.id if slot is not None else str(uuid.uuid4())
        if new.workspace_type is WorkspaceType.INHERIT and parent is not None:
            volume = parent.workspace_volume
        else:
            volume = workspace_volume_name(new.owner, new.workspace_type, new.workspace_id, sid)
        session = Session(
            id=sid,
            status=status,
            queue_position=ahead + 1 if status is SessionStatus.QUEUED else None,
            owner=new.owner,
            workspace_type=new.workspace_type,
            workspace_id=new.workspace_id,
            workspace_volume=volume,
            parent_session_id=parent.id if parent else None,
            root_id=parent.root_id if parent else sid,
            depth=parent.depth + 1 if parent else 0,
            callback_url=new.callback_url,
        )
        proxy_key: str | None
        if slot is not None:
            proxy_key, session.proxy_key_hash = None, slot.proxy_key_hash
            session.container_id = slot.container_id
        else:
            proxy_key, session.proxy_key_hash = new_proxy_key()
        session.budget_usd = session_budget
        if parent is not None:
            await tree.admit_child(db, parent=parent, limits=self._limits())
        else:
            db.add(SpawnTree(root_id=sid, owner=new.owner, budget_usd=tree_budget))
        session.config = stored
        session.idle_timeout_s = (
            cfg.idle_timeout_s
            if cfg.idle_timeout_s is not None
            else self.settings.session_idle_timeout_s
        )
        lifetime = _lifetime(cfg.max_lifetime_s, self.settings.session_max_lifetime_s)
        if lifetime:
            session.expires_at = utcnow() + timedelta(seconds=lifetime)
        db.add(session)
        await db.commit()
        return session, proxy_key

    async def _profile_servers(self, db: AsyncSession, new: _NewSession) -> str | None:
        """The servers of the config's MCP profiles, sealed for the stored config (None when
        it names none). Raises InvalidRequest (unknown profile, a server defined twice)."""
        if not new.config.mcp_profiles:
            return None
        box = self.settings.secret_box()
        servers = await attach(
            db,
            McpProfiles(box),
            owner=new.owner,
            names=new.config.mcp_profiles,
            own_servers=new.config.mcp_servers,
        )
        return box.seal(json.dumps(servers))

    async def start_queued(self, sid: str) -> bool:
        """Start a queued session if there is room: queued -> starting, then its volumes and
        container (its queued prompts pushed in order). True when it started; False when it
        is no longer queued. Raises AdmissionRefused while there is no room, and
        DependencyUnavailable (it is then queued again)."""
        async with self.admission_guard, self.db_factory() as db:
            await admission.lock(db)
            session = await db.get(Session, sid)
            if session is None or session.status is not SessionStatus.QUEUED:
                return False
            await admission.check_capacity(db, session.owner, self.settings.admission_limits())
            proxy_key, key_hash = new_proxy_key()
            flipped = (
                await db.exec(
                    update(Session)
                    .where(col(Session.id) == sid)
                    .where(col(Session.status) == SessionStatus.QUEUED)
                    .values(
                        status=SessionStatus.STARTING,
                        queue_position=None,
                        proxy_key_hash=key_hash,
                        last_activity=utcnow(),
                    )
                )
            ).rowcount == 1
            await db.commit()
        if not flipped:
            return False
        async with self.db_factory() as db:
            session = await db.get(Session, sid)
            if session is None:
                return False
            parent = (
                await db.get(Session, session.parent_session_id)
                if session.parent_session_id
                else None
            )
            try:
                await self._make_volumes(session, parent)
                await self.requeue_prompts(sid)
                spec = session_spec(self.settings, session)
                await self._start_container(db, session, spec, proxy_key, name=f"ccgate-{sid}")
                self.ledger.track(sid)
            except BaseException:
                await db.rollback()
                await db.exec(
                    update(Session)
                    .where(col(Session.id) == sid)
                    .where(col(Session.status) == SessionStatus.STARTING)
                    .values(status=SessionStatus.QUEUED, container_id=None)
                )
                await db.commit()
                raise
        logger.info("queued session %s admitted", sid)
        return True


def _lifetime(asked: int | None, limit: int) -> int:
    """Seconds the session may live (0: unlimited): the asked lifetime, never past the
    deployment's limit."""
    if asked is None:
        return limit
    return min(asked, limit) if limit else asked


def _inherit(parent: Session, given: SessionConfig) -> SessionConfig:
    """A child's config: the parent's, overridden by the fields the request set."""
    base = {k: v for k, v in parent.config.items() if k in SessionConfig.model_fields}
    base.pop("max_budget_usd", None)  # the tree's budget belongs to the root
    base.pop("session_budget_usd", None)  # a child sets its own, or gets the default
    return SessionConfig.model_validate(base | given.model_dump(exclude_unset=True))
