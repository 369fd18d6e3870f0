"""Admission control: how many containers the deployment, and each user, may run at once.

A session needs a container while it is live (``starting``, ``idle``, ``running``); a paused or
queued one needs none. Before a container is started — a create, or the resume of a paused
session — :func:`check_capacity` counts, in the transaction that will commit the new live
session and under the deployment's admission lock (PostgreSQL advisory transaction lock;
SQLite serialises writers anyway), so concurrent creates never overshoot:

- ``CCGATE_MAX_LIVE_SESSIONS``: live sessions of the whole deployment;
- ``CCGATE_MAX_LIVE_SESSIONS_PER_USER``: live sessions of the session's owner;
- ``CCGATE_HOST_MEMORY_RESERVE_MIB``: the host's available memory (``MemAvailable`` of
  /proc/meminfo) must stay above this reserve.

Over a limit: :class:`AdmissionRefused` (429, ``Retry-After``, a message naming the limit and
its value) — or, when the client asked to queue, the session waits (status ``queued``, or
``paused`` with its prompt queued) and the lifecycle loop admits waiting sessions in a fair
order (:func:`fair_order`: round-robin over users, oldest first within a user) as room frees.
Busy sessions are never paused or evicted to make room. ``CCGATE_MAX_ACTIVE_TURNS_PER_USER``
bounds a user's queued + running turns (a chat over it is refused the same way).
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import ColumnElement, func, true
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import Session, Turn, TurnStatus
from gateway.errors import AdmissionRefused
from gateway.services.tree import LIVE

_LOCK_KEY = zlib.crc32(b"ccgate-admission")
_MEMINFO = "/proc/meminfo"

T = TypeVar("T")


@dataclass(frozen=True)
class Limits:
    """Admission limits (0: none); from Settings."""

    max_live: int
    max_live_per_user: int
    max_active_turns_per_user: int
    memory_reserve_mib: int
    retry_after_s: int


def available_memory_mib(path: str = _MEMINFO) -> int | None:
    """The host's ``MemAvailable`` in MiB (None when it cannot be read: not Linux)."""
    try:
        with open(path) as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


async def lock(db: AsyncSession) -> None:
    """Take the deployment's admission lock for the rest of the transaction."""
    if db.get_bind().dialect.name == "postgresql":
        await db.exec(select(func.pg_advisory_xact_lock(_LOCK_KEY)))


async def check_capacity(
    db: AsyncSession, owner: str, limits: Limits, *, memory: bool = True
) -> None:
    """Raise AdmissionRefused unless one more live session of ``owner`` fits. Call it in the
    transaction that makes the session live, after :func:`lock`. ``memory=False`` leaves out
    the host memory reserve (:func:`check_memory`: a session taking a warm-pool container
    starts none)."""
    if limits.max_live:
        live = await _count_live(db, None)
        if live >= limits.max_live:
            raise AdmissionRefused(
                f"the deployment runs its maximum of {limits.max_live} live sessions "
                f"(CCGATE_MAX_LIVE_SESSIONS); retry later, pause or stop a session, or ask "
                f"to queue (?queue=true)",
                limit="max_live_sessions",
                retry_after_s=limits.retry_after_s,
            )
    if limits.max_live_per_user:
        mine = await _count_live(db, owner)
        if mine >= limits.max_live_per_user:
            raise AdmissionRefused(
                f"you have {mine} live sessions, the maximum per user "
                f"(CCGATE_MAX_LIVE_SESSIONS_PER_USER={limits.max_live_per_user}); pause or "
                f"stop one, or ask to queue (?queue=true)",
                limit="max_live_sessions_per_user",
                retry_after_s=limits.retry_after_s,
            )
    if memory:
        check_memory(limits)


def check_memory(limits: Limits) -> None:
    """Raise AdmissionRefused while the host's available memory is below the reserve."""
    if limits.memory_reserve_mib:
        free = available_memory_mib()
        if free is not None and free < limits.memory_reserve_mib:
            raise AdmissionRefused(
                f"the host has {free} MiB of memory available and keeps "
                f"{limits.memory_reserve_mib} MiB in reserve (CCGATE_HOST_MEMORY_RESERVE_MIB); "
                f"retry later or ask to queue (?queue=true)",
                limit="host_memory_reserve_mib",
                retry_after_s=limits.retry_after_s,
            )


def turns_below_limit(owner: str, limits: Limits) -> ColumnElement[bool]:
    """SQL condition: ``owner`` has fewer queued + running prompts than the limit (always
    true without one); embedded in the turn's INSERT."""
    if not limits.max_active_turns_per_user:
        return true()
    return active_turns_below(owner, limits.max_active_turns_per_user)


def active_turns_below(
    owner: str | ColumnElement[str], limit: int | ColumnElement[int]
) -> ColumnElement[bool]:
    """SQL condition: ``owner`` has fewer than ``limit`` queued + running prompts (values or
    bound parameters, for statements built once)."""
    active = (
        select(func.count())
        .select_from(Turn)
        .join(Session, col(Session.id) == col(Turn.session_id))
        .where(
            col(Session.owner) == owner,
            col(Turn.status).in_([TurnStatus.QUEUED, TurnStatus.RUNNING]),
        )
        .scalar_subquery()
    )
    return active < limit


async def check_turns(db: AsyncSession, owner: str, limits: Limits) -> None:
    """Raise AdmissionRefused when ``owner`` already has the maximum of queued + running
    turns."""
    if not limits.max_active_turns_per_user:
        return
    active = (
        await db.exec(
            select(func.count())
            .select_from(Turn)
            .join(Session, col(Session.id) == col(Turn.session_id))
            .where(
                col(Session.owner) == owner,
                col(Turn.status).in_([TurnStatus.QUEUED, TurnStatus.RUNNING]),
            )
        )
    ).one()
    if active >= limits.max_active_turns_per_user:
        raise AdmissionRefused(
            f"you have {active} prompts queued or running, the maximum per user "
            f"(CCGATE_MAX_ACTIVE_TURNS_PER_USER={limits.max_active_turns_per_user}); wait for "
            f"some to finish",
            limit="max_active_turns_per_user",
            retry_after_s=limits.retry_after_s,
        )


async def _count_live(db: AsyncSession, owner: str | None) -> int:
    query = select(func.count()).select_from(Session).where(col(Session.status).in_(LIVE))
    if owner is not None:
        query = query.where(col(Session.owner) == owner)
    return int((await db.exec(query)).one())


def fair_order(waiting: Sequence[tuple[str, T]]) -> list[T]:
    """Round-robin over owners, each owner's items in their given (arrival) order:
    ``[(owner, item), …]`` oldest first → items in admission order. A user with 50 waiting
    sessions does not hold back another user's first one."""
    queues: dict[str, list[T]] = defaultdict(list)
    for owner, item in waiting:
        queues[owner].append(item)
    order: list[T] = []
    rank = 0
    while len(order) < len(waiting):
        for owner in _owners_by_arrival(waiting):
            if rank < len(queues[owner]):
                order.append(queues[owner][rank])
        rank += 1
    return order


def _owners_by_arrival(waiting: Iterable[tuple[str, object]]) -> list[str]:
    seen: dict[str, None] = {}
    for owner, _ in waiting:
        seen.setdefault(owner, None)
    return list(seen)
