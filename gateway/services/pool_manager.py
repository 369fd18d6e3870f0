"""The pool manager: keeps the warm pools filled, replaces what dies, removes what is stale.

One replica at a time does it, under the ``warm-pool:<deployment>`` lease (lease.py); claims
happen on every replica (warm_pool.claim). Every ``_INTERVAL_S`` — or at once when a create
claimed a container — a tick:

1. **reconciles** (every ``_RECONCILE_EVERY`` ticks and at the first): a ready slot whose
   container is not running is discarded (``dead``); a ``starting`` slot no refill of this
   replica owns, older than the ready timeout, is discarded (``stale``: its refill died with
   its replica); a slot of a profile that is gone or changed is discarded
   (``profile_changed``); a ready slot's Redis ACL user is re-created if a Redis restart lost
   it. Pool containers no row knows are the reaper's (they carry a session label no session or
   slot has);
2. **refills** each profile up to its target — ``min_size``, plus one per claim in the last
   minute, at most ``max_size`` — with at most ``warm_pool_refill_concurrency`` containers
   starting at once, never past ``max_live_sessions`` (live sessions + pool containers) or
   below the host memory reserve. Pool containers yield to sessions: when live sessions grow,
   surplus ready containers are discarded (``surplus``).

A refill inserts the slot row (``starting``) before anything exists, then creates the volumes
and the Redis login concurrently, starts the container (hardened like any session's), waits
for the wrapper's ready report and marks the row ``ready``. Any failure removes everything it
made (``ccgate_pool_refill_failures``). Dependencies down skip a tick; nothing here is fatal
to the gateway: creates then start cold.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import timedelta

from redis.exceptions import RedisError
from sqlalchemy import delete, func, update
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import col, select

from gateway.db.errors import is_outage
from gateway.db.models import PoolSlot, Session, as_utc, utcnow
from gateway.errors import DependencyUnavailable, GatewayError
from gateway.services import session_redis, warm_pool
from gateway.services.admission import available_memory_mib
from gateway.services.lease import Lease
from gateway.services.metering.credentials import new_proxy_key
from gateway.services.provision import config_volume_name, workspace_volume_name
from gateway.services.runtime.base import LABEL_POOL, LABEL_SESSION, ContainerState
from gateway.services.sessions import SessionService
from gateway.services.tree import LIVE
from gateway.services.warm_pool import Profile
from wrapper.protocol import pool_claims_key

logger = logging.getLogger(__name__)

_INTERVAL_S = 1.0
_RECONCILE_EVERY = 5
_STALE_MARGIN_S = 30.0


class PoolManager:
    """Fills, heals and shrinks the warm pools (run it under the Supervisor)."""

    def __init__(self, service: SessionService, lease: Lease, profiles: list[Profile]) -> None:
        self._service = service
        self._settings = service.settings
        self._lease = lease
        self._profiles = {p.name: p for p in profiles}
        self._woken = asyncio.Event()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._ticks = 0

    def wake(self) -> None:
        """Refill now (a container was just claimed)."""
        self._woken.set()

    def reconcile_soon(self) -> None:
        """Reconcile at the next tick, now (a pool container died)."""
        self._ticks = 0
        self._woken.set()

    async def run(self) -> None:
        """Tick forever; on the way out, refills in flight are cancelled and cleaned up and
        the lease is given up."""
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), _INTERVAL_S)
                self._woken.clear()
                try:
                    if await self._lease.acquire():
                        await self.tick()
                except (DependencyUnavailable, RedisError, OSError) as exc:
                    logger.warning("warm pool: tick skipped: %s", exc)
                except SQLAlchemyError as exc:
                    if not is_outage(exc):
                        raise
                    logger.warning("warm pool: tick skipped, database unavailable: %s", exc)
        finally:
            tasks = list(self._inflight.values())
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self._lease.release()

    async def tick(self) -> dict[str, int]:
        """One pass; returns what it did."""
        done = {"discarded": 0, "refills_started": 0}
        if self._ticks % _RECONCILE_EVERY == 0:
            done["discarded"] += await self.reconcile()
        self._ticks += 1
        async with self._service.db_factory() as db:
            counts = await warm_pool.slot_counts(db)
            live = (
                await db.exec(
                    select(func.count()).select_from(Session).where(col(Session.status).in_(LIVE))
                )
            ).one()
        pooled = sum(counts.values())
        room = self._room(int(live), pooled)
        for profile in self._profiles.values():
            ready = counts.get((profile.name, warm_pool.READY), 0)
            have = ready + counts.get((profile.name, warm_pool.STARTING), 0)
            target = await self._target(profile)
            if room < 0 and ready:
                done["discarded"] += await self._shrink(profile, min(ready, -room))
                room = min(0, room + ready)
            while have < target and room > 0 and self._has_capacity():
                await self._start_refill(profile)
                have += 1
                room -= 1
                done["refills_started"] += 1
        return done

    def _room(self, live: int, pooled: int) -> int:
        limit = self._settings.max_live_sessions
        return 1 << 30 if not limit else limit - live - pooled

    def _has_capacity(self) -> bool:
        if len(self._inflight) >= self._settings.warm_pool_refill_concurrency:
            return False
        reserve = self._settings.host_memory_reserve_mib
        free = available_memory_mib() if reserve else None
        return free is None or free >= reserve

    async def _target(self, profile: Profile) -> int:
        try:
            recent = int(await self._service.redis.get(pool_claims_key(profile.name)) or 0)
        except (RedisError, OSError):
            recent = 0
        return min(profile.max_size, profile.min_size + recent)

    async def _shrink(self, profile: Profile, count: int) -> int:
        async with self._service.db_factory() as db:
            ids = (
                await db.exec(
                    select(PoolSlot.id)
                    .where(col(PoolSlot.profile) == profile.name)
                    .where(col(PoolSlot.status) == warm_pool.READY)
                    .limit(count)
                )
            ).all()
        return sum([await self.discard(sid, "surplus") for sid in ids])

    # ------------------------------------------------------------------------- refill

    async def _start_refill(self, profile: Profile) -> None:
        slot_id = str(uuid.uuid4())
        proxy_key, key_hash = new_proxy_key()
        async with self._service.db_factory() as db:
            db.add(
                PoolSlot(
                    id=slot_id,
                    profile=profile.name,
                    fingerprint=profile.fingerprint,
                    status=warm_pool.STARTING,
                    proxy_key_hash=key_hash,
                )
            )
            await db.commit()
        task = asyncio.create_task(self._refill(profile, slot_id, proxy_key))
        self._inflight[slot_id] = task
        task.add_done_callback(lambda _: self._inflight.pop(slot_id, None))

    async def _refill(self, profile: Profile, slot_id: str, proxy_key: str) -> None:
        svc, s = self._service, self._settings
        started = time.monotonic()
        try:
            labels = {LABEL_SESSION: slot_id, LABEL_POOL: profile.name}
            workspace = workspace_volume_name("", "ephemeral", None, slot_id)
            config_volume = config_volume_name(slot_id)
            _, _, (username, password) = await asyncio.gather(
                svc.runtime.create_volume(workspace, labels),
                svc.runtime.create_volume(config_volume, labels),
                session_redis.provision(
                    svc.redis,
                    profile.spec(s, slot_id),
                    acl_secret=svc.jwt_key if s.session_redis_acl else None,
                ),
            )
            assert svc.network is not None
            await svc.network.ensure()
            info = await svc.start_container(
                svc.container_spec(
                    name=f"ccgate-{slot_id}",
                    labels=labels,
                    env=svc.container_env(
                        slot_id,
                        dict(profile.config.get("env") or {}),
                        username,
                        password,
                        proxy_key,
                    ),
                    workspace_volume=workspace,
                    config_volume=config_volume,
                    open_egress=(profile.config.get("egress") or {}).get("policy") == "open",
                )
            )
            async with svc.db_factory() as db:
                await db.exec(
                    update(PoolSlot).where(col(PoolSlot.id) == slot_id).values(container_id=info.id)
                )
                await db.commit()
            deadline = time.monotonic() + s.warm_pool_ready_timeout_s
            while not await session_redis.wait_pool_ready(svc.redis, slot_id, 1.0):
                if time.monotonic() > deadline:
                    raise DependencyUnavailable(
                        "docker", f"pool container not ready in {s.warm_pool_ready_timeout_s}s"
                    )
            async with svc.db_factory() as db:
                await db.exec(
                    update(PoolSlot)
                    .where(col(PoolSlot.id) == slot_id, col(PoolSlot.status) == warm_pool.STARTING)
                    .values(status=warm_pool.READY, ready_at=utcnow())
                )
                await db.commit()
            svc.metrics.pool_refill_seconds.labels(profile=profile.name).observe(
                time.monotonic() - started
            )
            logger.info("warm pool %s: container %s ready", profile.name, slot_id)
        except (GatewayError, RedisError, OSError, SQLAlchemyError, asyncio.CancelledError) as exc:
            if not isinstance(exc, asyncio.CancelledError):
                logger.warning("warm pool %s: refill failed: %s", profile.name, exc)
                svc.metrics.pool_refill_failures.labels(profile=profile.name).inc()
            with contextlib.suppress(Exception):
                await asyncio.shield(self.discard(slot_id, None))
            if isinstance(exc, asyncio.CancelledError):
                raise

    # ------------------------------------------------------------------------- discard

    async def discard(self, slot_id: str, reason: str | None) -> int:
        """Remove an unclaimed slot: its row first (a conditional DELETE: a claimed one is
        left alone), then its container, volumes and Redis keys. Returns 1 if it removed
        it, 0 if the slot was claimed or already gone."""
        svc = self._service
        async with svc.db_factory() as db:
            gone = await db.exec(delete(PoolSlot).where(col(PoolSlot.id) == slot_id))
            await db.commit()
        if gone.rowcount != 1:
            return 0
        await svc.runtime.remove(f"ccgate-{slot_id}")
        for volume in (
            workspace_volume_name("", "ephemeral", None, slot_id),
            config_volume_name(slot_id),
        ):
            await svc.runtime.remove_volume(volume)
        await session_redis.purge(svc.redis, slot_id)
        if reason is not None:
            svc.metrics.pool_discarded.labels(reason=reason).inc()
            logger.info("warm pool: discarded %s (%s)", slot_id, reason)
        return 1

    async def reconcile(self) -> int:
        """Discard dead, stale and outdated slots; restore lost ACL users. Returns how many
        slots it discarded."""
        svc, s = self._service, self._settings
        async with svc.db_factory() as db:
            slots = (await db.exec(select(PoolSlot))).all()
        if not slots:
            return 0
        containers = await svc.runtime.list_managed()
        running = {
            c.labels.get(LABEL_SESSION)
            for c in containers
            if LABEL_POOL in c.labels and c.state is ContainerState.RUNNING
        }
        stale_before = utcnow() - timedelta(seconds=s.warm_pool_ready_timeout_s + _STALE_MARGIN_S)
        discarded = 0
        for slot in slots:
            if slot.id in self._inflight:
                continue
            profile = self._profiles.get(slot.profile)
            reason = None
            if profile is None or profile.fingerprint != slot.fingerprint:
                reason = "profile_changed"
            elif slot.status == warm_pool.READY and slot.id not in running:
                reason = "dead"
            elif (
                slot.status == warm_pool.STARTING
                and (as_utc(slot.created_at) or utcnow()) < stale_before
            ):
                reason = "stale"
            if reason is not None:
                discarded += await self.discard(slot.id, reason)
            elif slot.status == warm_pool.READY and s.session_redis_acl:
                password = session_redis.acl_password(svc.jwt_key, slot.id)
                if await session_redis.ensure_acl_user(svc.redis, slot.id, password, pool=True):
                    logger.warning("warm pool: re-created the Redis ACL user of %s", slot.id)
        return discarded
