"""Warm pool: profiles, the fingerprint a create is matched by, and the atomic claim.

A pool container is started under a fresh session id (a *slot*): its container name, labels,
volumes (``ccgate-ws-<id>``, ``ccgate-cfg-<id>``), Redis keys and ACL user are those of the
session that will claim it, which therefore takes over the id. Its wrapper launches the CLI
with the profile's flags, finishes ``initialize`` and the MCP handshakes, and waits on its
claim key (wrapper/serve.py). The workspace question (a volume cannot be added to a running
container) is answered by ownership: the pool creates the empty workspace volume with the
container, and the claiming session adopts it — so only creates with an empty (ephemeral)
workspace can claim; persistent, inherited and cloned workspaces start cold.

Matching is by fingerprint, not by field lists: the SHA-256 of the CLI command line the
session would run (wrapper.launch.build_cli_args, session id blanked) plus what else is
fixed at container start (the user's env, the egress policy, image, runtime, limits). Two
configs that launch the same CLI in the same container match; anything else misses.

The claim (:func:`claim`) is a conditional DELETE of one ready row in the creating
transaction, which inserts the session with the same id: two replicas can never take the same
container, and a crash between the two leaves either the slot or the session, never neither.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, func
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.config import Settings
from gateway.db.models import PoolSlot, Session
from gateway.schemas import SessionConfig
from gateway.services.provision import session_spec
from wrapper.launch import build_cli_args
from wrapper.protocol import SessionSpec

READY = "ready"
STARTING = "starting"
_CLAIM_ATTEMPTS = 3


@dataclass(frozen=True)
class Profile:
    """A configured pool, resolved: its session config (JSON, as a create stores it) and the
    fingerprint of the container it runs."""

    name: str
    min_size: int
    max_size: int
    config: dict[str, Any]
    fingerprint: str

    def spec(self, settings: Settings, slot_id: str) -> SessionSpec:
        """The wrapper's spec for a pool container of this profile (``pooled``)."""
        return dataclasses.replace(
            _spec_for(settings, slot_id, self.config), pooled=True, resumed_at=None
        )


def _spec_for(settings: Settings, sid: str, config: dict[str, Any]) -> SessionSpec:
    return session_spec(settings, Session(id=sid, owner="", workspace_volume="", config=config))


def container_fingerprint(settings: Settings, spec: SessionSpec, config: dict[str, Any]) -> str:
    """Hex SHA-256 of what a container launches and is started with; equal for a session
    and a profile exactly when a pooled container can serve the session."""
    launch = dataclasses.replace(
        spec,
        session_id="",
        cli_session_id=None,
        pooled=False,
        resumed_at=None,
        timeout_seconds=None,
        interrupt_grace_s=0.0,
    )
    material = {
        "args": build_cli_args(launch, claude_bin="claude", resume=False),
        "gateway_url": spec.gateway_url,
        "env": dict(sorted((config.get("env") or {}).items())),
        "egress": (config.get("egress") or {}).get("policy", "none"),
        "image": settings.image,
        "runtime": settings.container_runtime,
        "limits": [settings.container_memory, settings.container_cpus, settings.container_pids],
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def resolve_profiles(settings: Settings) -> list[Profile]:
    """The deployment's pools from ``CCGATE_WARM_POOL``; raises ValueError naming the profile
    whose config is invalid or asks for an allowlist (its forward proxy is per session)."""
    profiles = []
    for item in settings.warm_pool:
        try:
            config = SessionConfig.model_validate(item.config)
        except ValueError as exc:
            raise ValueError(f"CCGATE_WARM_POOL profile {item.name}: {exc}") from exc
        if config.egress.policy == "allowlist":
            raise ValueError(
                f"CCGATE_WARM_POOL profile {item.name}: egress allowlist sessions start cold "
                f"(their forward proxy is made per session); use none or open"
            )
        if config.mcp_profiles:
            raise ValueError(
                f"CCGATE_WARM_POOL profile {item.name}: mcp_profiles belong to a user; "
                "give the servers in mcp_servers"
            )
        stored = config.model_dump(mode="json")
        spec = _spec_for(settings, "profile", stored)
        profiles.append(
            Profile(
                name=item.name,
                min_size=item.min_size,
                max_size=item.max_size,
                config=stored,
                fingerprint=container_fingerprint(settings, spec, stored),
            )
        )
    return profiles


def match(profiles: list[Profile], fingerprint: str) -> Profile | None:
    """The profile whose containers can serve a session with this fingerprint."""
    return next((p for p in profiles if p.fingerprint == fingerprint), None)


async def claim(db: AsyncSession, fingerprint: str) -> PoolSlot | None:
    """Take one ready slot with ``fingerprint`` (the oldest) in ``db``'s transaction: its row
    is deleted, the caller inserts the session under the slot's id and commits both. None when
    there is none (or others took every candidate)."""
    for _ in range(_CLAIM_ATTEMPTS):
        candidates = (
            await db.exec(
                select(PoolSlot)
                .where(col(PoolSlot.fingerprint) == fingerprint, col(PoolSlot.status) == READY)
                .order_by(col(PoolSlot.ready_at))
                .limit(4)
            )
        ).all()
        if not candidates:
            return None
        for slot in candidates:
            taken = await db.exec(
                delete(PoolSlot).where(col(PoolSlot.id) == slot.id, col(PoolSlot.status) == READY)
            )
            if taken.rowcount == 1:
                db.expunge(slot)
                return slot
    return None


async def slot_counts(db: AsyncSession) -> dict[tuple[str, str], int]:
    """{(profile, status): count} of unclaimed slots."""
    rows = (
        await db.exec(
            select(PoolSlot.profile, PoolSlot.status, func.count()).group_by(
                col(PoolSlot.profile), col(PoolSlot.status)
            )
        )
    ).all()
    return {(profile, status): int(n) for profile, status, n in rows}
