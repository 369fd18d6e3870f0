"""Budgets enforced at the model proxy: reserve before a request, commit after it.

Three levels, each optional: the session (``Session.budget_usd``), the tree (``SpawnTree
.budget_usd``) and the user per UTC day (``Settings.user_daily_budget_usd`` on a ``UsageDay``
row). Before a request is forwarded, :func:`reserve` takes the tree's row lock (a write, so
SQLite serialises it too), reads every level that has a budget and reserves the same amount at
each: ``min(estimate, smallest room left)``. After the response, :func:`commit` adds the metered
cost to spend, releases the reservation and records the request, in one transaction under the
same lock. Concurrent requests of one tree therefore never see the same room twice: once the
reservations fill a budget, others wait (``BudgetBusy``, a 429 the CLI retries) until a commit
frees it, and once spend reaches a budget every request is refused (``BudgetExhausted``, a 400
naming the budget). A request can overshoot by at most its own cost beyond its reservation.

Lock order: tree row, then session row, then the user's day row (as everywhere: tree.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from gateway.db.models import (
    ModelRequest,
    Session,
    SessionStatus,
    SpawnTree,
    Turn,
    UsageDay,
)
from gateway.services.metering.prices import Usage

LIVE = [SessionStatus.STARTING, SessionStatus.IDLE, SessionStatus.RUNNING]


class BudgetExhausted(Exception):
    """A budget is spent; ``level`` is session | tree | user_daily."""

    def __init__(self, level: str, budget: float, spent: float) -> None:
        names = {
            "session": "session budget (session_budget_usd)",
            "tree": "tree budget (max_budget_usd of the root session)",
            "user_daily": "daily budget of this user (CCGATE_USER_DAILY_BUDGET_USD)",
        }
        super().__init__(
            f"ccgate: the {names[level]} of ${budget:.4f} is spent (${spent:.4f} used); "
            "no further model requests are allowed"
        )
        self.level = level


class BudgetBusy(Exception):
    """A budget's remaining room is fully reserved by requests in flight: retry shortly."""

    def __init__(self, level: str) -> None:
        super().__init__(
            f"ccgate: the remaining {level} budget is reserved by model requests in flight; "
            "retry when they finish"
        )
        self.level = level


@dataclass(frozen=True)
class Grant:
    """A proxy credential resolved to its session (the only identity a container has)."""

    session_id: str
    root_id: str
    owner: str
    budgeted: bool
    """True when the session or its tree has a budget (the user's daily one is separate)."""


@dataclass(frozen=True)
class Reservation:
    """What :func:`reserve` held: ``amount_usd`` at each of ``levels`` on ``day``."""

    amount_usd: float = 0.0
    levels: frozenset[str] = frozenset()
    day: str = ""


def utc_day(now: datetime | None = None) -> str:
    """``YYYY-MM-DD`` of ``now`` (default: the current time) in UTC."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%d")


async def resolve(db: AsyncSession, key_hash: str) -> Grant | None:
    """The live session holding the credential whose SHA-256 is ``key_hash`` (None: unknown,
    revoked or the session ended). One indexed query."""
    row = (
        await db.exec(
            select(Session.id, Session.root_id, Session.owner, Session.budget_usd)
            .where(col(Session.proxy_key_hash) == key_hash)
            .where(col(Session.status).in_(LIVE))
        )
    ).first()
    if row is None:
        return None
    sid, root, owner, s_budget = row
    tree_budget = (
        await db.exec(select(SpawnTree.budget_usd).where(col(SpawnTree.root_id) == root))
    ).first()
    return Grant(
        session_id=sid,
        root_id=root,
        owner=owner,
        budgeted=s_budget is not None or tree_budget is not None,
    )


async def turn_at(db: AsyncSession, session_id: str, moment: datetime) -> str | None:
    """The turn the session's CLI was working on at ``moment``: the oldest one created by then
    and not finished before it (turns run one at a time, in order)."""
    rows = await db.exec(
        select(Turn.id)
        .where(col(Turn.session_id) == session_id)
        .where(col(Turn.created_at) <= moment)
        .where(or_(col(Turn.completed_at).is_(None), col(Turn.completed_at) >= moment))
        .order_by(col(Turn.created_at))
        .limit(1)
    )
    return rows.first()


async def _lock_tree(db: AsyncSession, root_id: str) -> None:
    """A no-op write on the tree row: PostgreSQL's row lock, SQLite's write lock."""
    await db.exec(
        update(SpawnTree)
        .where(col(SpawnTree.root_id) == root_id)
        .values(reserved_usd=col(SpawnTree.reserved_usd))
    )


async def _ensure_day(db: AsyncSession, owner: str, day: str) -> None:
    dialect = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
    await db.exec(
        dialect.insert(UsageDay)
        .values(owner=owner, day=day)
        .on_conflict_do_nothing(index_elements=["owner", "day"])
    )


async def reserve(
    db: AsyncSession,
    grant: Grant,
    *,
    estimate_usd: float,
    user_daily_budget_usd: float | None,
    day: str,
) -> Reservation:
    """Reserve up to ``estimate_usd`` at every level with a budget and commit. Returns what was
    reserved (nothing when no level has a budget). Raises BudgetExhausted or BudgetBusy (after
    rolling back)."""
    if not grant.budgeted and user_daily_budget_usd is None:
        return Reservation(day=day)
    await _lock_tree(db, grant.root_id)
    levels: list[tuple[str, float, float, float]] = []  # (level, budget, spent, reserved)
    tree = (
        await db.exec(
            select(SpawnTree.budget_usd, SpawnTree.spend_usd, SpawnTree.reserved_usd).where(
                col(SpawnTree.root_id) == grant.root_id
            )
        )
    ).first()
    session = (
        await db.exec(
            select(Session.budget_usd, Session.total_cost_usd, Session.reserved_usd).where(
                col(Session.id) == grant.session_id
            )
        )
    ).first()
    if session is not None and session[0] is not None:
        levels.append(("session", session[0], session[1], session[2]))
    if tree is not None and tree[0] is not None:
        levels.append(("tree", tree[0], tree[1], tree[2]))
    if user_daily_budget_usd is not None:
        await _ensure_day(db, grant.owner, day)
        used = (
            await db.exec(
                select(UsageDay.spend_usd, UsageDay.reserved_usd).where(
                    col(UsageDay.owner) == grant.owner, col(UsageDay.day) == day
                )
            )
        ).one()
        levels.append(("user_daily", user_daily_budget_usd, used[0], used[1]))
    room = estimate_usd
    for level, budget, spent, reserved in levels:
        if spent >= budget:
            await db.rollback()
            raise BudgetExhausted(level, budget, spent)
        left = budget - spent - reserved
        if left <= 1e-12:
            await db.rollback()
            raise BudgetBusy(level)
        room = min(room, left)
    held = Reservation(room, frozenset(lv[0] for lv in levels), day) if levels else None
    if held is not None:
        await _shift_reserved(db, grant, held, held.amount_usd)
    await db.commit()
    return held or Reservation(day=day)


async def _shift_reserved(db: AsyncSession, grant: Grant, held: Reservation, amount: float) -> None:
    """Add ``amount`` (negative to release) to the reserved figure of each held level."""
    levels, day = held.levels, held.day
    if "tree" in levels:
        await db.exec(
            update(SpawnTree)
            .where(col(SpawnTree.root_id) == grant.root_id)
            .values(reserved_usd=col(SpawnTree.reserved_usd) + amount)
        )
    if "session" in levels:
        await db.exec(
            update(Session)
            .where(col(Session.id) == grant.session_id)
            .values(reserved_usd=col(Session.reserved_usd) + amount)
        )
    if "user_daily" in levels:
        await db.exec(
            update(UsageDay)
            .where(col(UsageDay.owner) == grant.owner, col(UsageDay.day) == day)
            .values(reserved_usd=col(UsageDay.reserved_usd) + amount)
        )


def add_usage(total: dict[str, Any] | None, usage: Usage) -> dict[str, int]:
    """``total`` (a usage dict of counters) plus ``usage``; non-integer entries dropped."""
    out = {k: int(v) for k, v in (total or {}).items() if isinstance(v, int)}
    for key, value in usage.as_dict().items():
        out[key] = out.get(key, 0) + value
    return out


async def commit(
    db: AsyncSession,
    grant: Grant,
    record: ModelRequest,
    usage: Usage,
    held: Reservation,
) -> None:
    """Record one metered request: its row, spend and tokens on the turn, session, tree and
    the user's day, and the release of ``held``; commits. Idempotent: a request id already
    recorded changes nothing."""
    day = held.day
    await _lock_tree(db, grant.root_id)
    record.turn_id = await turn_at(db, grant.session_id, record.started_at)
    dialect = postgresql if db.get_bind().dialect.name == "postgresql" else sqlite
    inserted = await db.exec(
        dialect.insert(ModelRequest)
        .values(**record.model_dump())
        .on_conflict_do_nothing(index_elements=["id"])
    )
    if inserted.rowcount != 1:  # recorded already (a retried commit)
        await db.rollback()
        return
    cost = record.cost_usd
    await _shift_reserved(db, grant, held, -held.amount_usd)
    await db.exec(
        update(SpawnTree)
        .where(col(SpawnTree.root_id) == grant.root_id)
        .values(spend_usd=col(SpawnTree.spend_usd) + cost)
    )
    session = await db.get(Session, grant.session_id)
    if session is not None:
        session.total_cost_usd += cost
        session.usage = add_usage(session.usage, usage)
        db.add(session)
    if record.turn_id is not None:
        turn = await db.get(Turn, record.turn_id)
        if turn is not None:
            turn.cost_usd = (turn.cost_usd or 0.0) + cost
            turn.usage = add_usage(turn.usage, usage)
            db.add(turn)
    await _ensure_day(db, grant.owner, day)
    await db.exec(
        update(UsageDay)
        .where(col(UsageDay.owner) == grant.owner, col(UsageDay.day) == day)
        .values(
            spend_usd=col(UsageDay.spend_usd) + cost,
            requests=col(UsageDay.requests) + 1,
            input_tokens=col(UsageDay.input_tokens) + usage.input_tokens,
            output_tokens=col(UsageDay.output_tokens) + usage.output_tokens,
            cache_creation_input_tokens=col(UsageDay.cache_creation_input_tokens)
            + usage.cache_creation_input_tokens,
            cache_read_input_tokens=col(UsageDay.cache_read_input_tokens)
            + usage.cache_read_input_tokens,
        )
    )
    await db.commit()
