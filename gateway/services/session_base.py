"""The clients behind every session operation, shared by the SessionService's parts."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import redis.asyncio as aioredis
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import Principal
from gateway.config import Settings
from gateway.db.models import Session
from gateway.errors import (
    ContainerStartFailed,
    DependencyUnavailable,
    NotFound,
)
from gateway.metrics import Metrics
from gateway.services import family, session_redis
from gateway.services.artifacts import ArtifactStore
from gateway.services.egress import EgressProxies
from gateway.services.envelopes import notice_key
from gateway.services.event_hub import EventHub
from gateway.services.ledger import Ledger
from gateway.services.net_sandboxes import NetworkSandboxes
from gateway.services.network import SessionsNetwork
from gateway.services.runtime import ContainerRuntime
from gateway.services.runtime.base import ContainerInfo, ContainerSpec
from wrapper.protocol import EventType

if TYPE_CHECKING:  # warm_pool imports the services built on this base
    from gateway.services.warm_pool import Profile

logger = logging.getLogger("gateway.services.sessions")


@dataclass
class ServiceBase:
    """The clients every session operation uses (one instance per gateway process).

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
    network: SessionsNetwork | None = None
    """The sessions network and firewall (made from settings and runtime when not given)."""
    egress: EgressProxies | None = None
    """The forward proxies of allowlist sessions (made when not given)."""
    admission_guard: asyncio.Lock = field(default_factory=asyncio.Lock)
    """Serialises this process's admission checks with their commits (the database lock does
    it across replicas on PostgreSQL; SQLite deployments are one process)."""
    wake_lifecycle: Callable[[str], None] = field(default=lambda sid: None)
    """Tell the lifecycle loop a session waits for admission (set at start-up)."""
    pool_profiles: list[Profile] = field(default_factory=list)
    """The warm pools (warm_pool.py); empty: every session starts cold."""
    wake_pool: Callable[[], None] = field(default=lambda: None)
    """Tell the pool manager a container was claimed (set at start-up)."""

    sandboxes: NetworkSandboxes | None = None
    """The ready network sandboxes (made when not given)."""

    def __post_init__(self) -> None:
        if self.network is None:
            self.network = SessionsNetwork(self.settings, self.runtime)
        if self.egress is None:
            self.egress = EgressProxies(self.settings, self.db_factory)
        if self.sandboxes is None:
            self.sandboxes = NetworkSandboxes(
                self.settings, self.runtime, self.redis, self.metrics, self.network.ensure
            )

    async def start_container(self, spec: ContainerSpec) -> ContainerInfo:
        """Start a session or pool container, in a ready network sandbox when there is one
        (see net_sandboxes.py), else on its own network. A sandbox that cannot be joined is
        removed and the container started without one. Raises ContainerStartFailed,
        DependencyUnavailable (docker)."""
        assert self.sandboxes is not None
        sandbox = await self.sandboxes.claim(spec.network)
        if sandbox is None:
            return await self.runtime.start(spec)
        try:
            return await self.runtime.start(dataclasses.replace(spec, network_from=sandbox))
        except ContainerStartFailed as exc:
            logger.warning("network sandbox %s not joined (%s); own network", sandbox[:12], exc)
            self.metrics.netns_claims.labels(result="failed").inc()
            await self.sandboxes.discard(sandbox)
            return await self.runtime.start(spec)

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

    async def _notify(self, parent_id: str, event: EventType, data: dict[str, Any]) -> None:
        try:
            await session_redis.notify(
                self.redis, parent_id, event, data, key=notice_key(self.jwt_key)
            )
        except DependencyUnavailable as exc:
            logger.warning("could not notify %s of %s: %s", parent_id, event, exc)
