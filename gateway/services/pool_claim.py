"""A create that claims a warm-pool container: match, claim, bind — or fall back to cold.

See warm_pool.py for the design. Here: which creates may claim (an empty workspace and a
config whose container fingerprint equals a profile's), the claim inside the creating
transaction, and the binding after its commit: the session's spec and token are written under
the id the container already carries, the Claim is pushed, and the container must publish its
first event within ``CLAIM_TAKEN_TIMEOUT_S`` — a container that died or hung meanwhile is
removed and the session starts cold instead (never an error for the client).
"""

from __future__ import annotations

import time
from typing import Any

from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.auth import mint_token
from gateway.db.models import PoolSlot, Session, WorkspaceType
from gateway.services import session_redis, warm_pool
from gateway.services.metering.credentials import new_proxy_key
from gateway.services.provision import Provisioning, session_spec
from wrapper.protocol import Claim, SessionSpec

CLAIM_TAKEN_TIMEOUT_S = 3.0
"""How long a claimed container has to take its claim and publish its first event (it waits
on the claim in BLPOP: normally a few milliseconds)."""


class PoolClaims(Provisioning):
    """Claiming and binding warm-pool containers (mixed into the session service)."""

    async def _claim_slot(
        self, db: AsyncSession, workspace_type: WorkspaceType, config: dict[str, Any]
    ) -> PoolSlot | None:
        """Claim a ready pool container for a session with this (resolved, stored) config in
        ``db``'s transaction, or None (counted in ``ccgate_pool_misses`` by reason)."""
        if workspace_type is not WorkspaceType.EPHEMERAL:
            self.metrics.pool_misses.labels(reason="workspace").inc()
            return None
        probe = Session(id="probe", owner="", workspace_volume="", config=config)
        fingerprint = warm_pool.container_fingerprint(
            self.settings, session_spec(self.settings, probe), config
        )
        profile = warm_pool.match(self.pool_profiles, fingerprint)
        if profile is None:
            self.metrics.pool_misses.labels(reason="no_profile").inc()
            return None
        slot = await warm_pool.claim(db, fingerprint)
        if slot is None:
            self.metrics.pool_misses.labels(reason="empty").inc()
            return None
        self.metrics.pool_claims.labels(profile=profile.name).inc()
        await session_redis.count_claim(self.redis, profile.name)
        return slot

    async def _bind_claimed(self, session: Session, spec: SessionSpec) -> bool:
        """Hand the claimed container its session: spec, token, then the Claim. True once
        the container published its first event; False if not within CLAIM_TAKEN_TIMEOUT_S.
        Raises DependencyUnavailable("redis", ...)."""
        ttl = self.settings.session_token_ttl_s
        token = mint_token(
            key=self.jwt_key, user=session.owner, ttl_s=ttl, session_scope=session.id
        )
        # The ACL user exists already (made for the pool container under this id).
        await session_redis.provision(
            self.redis, spec, acl_secret=None, token=token, token_ttl_s=ttl
        )
        claim = Claim(session_id=session.id, spec=spec.to_json(), claimed_at=time.time())
        await session_redis.push_claim(self.redis, claim)
        return await session_redis.wait_claim_taken(
            self.redis, session.id, timeout_s=CLAIM_TAKEN_TIMEOUT_S
        )

    async def _unclaim(self, db: AsyncSession, session: Session) -> str:
        """The claimed container did not answer: remove it and its volumes, give the session a
        new model credential and no container (committed); returns the credential for the
        cold start that follows."""
        self.metrics.pool_misses.labels(reason="dead").inc()
        # Forget the container first: its death is then not this session's (the death watch
        # would otherwise close the session's stream as a crash and pause it).
        proxy_key, session.proxy_key_hash = new_proxy_key()
        session.container_id = None
        db.add(session)
        await db.commit()
        await self._remove_resources(session, quiet=True)
        await session_redis.drop_claim(self.redis, session.id)
        return proxy_key
